"""Command line: ``quicksilver generate | eval | eval-gen | bench | calibrate | policies |
models``.

Each subcommand checks its arguments (and that its JSON output can be written) before loading a
model, then calls the library. Errors meant for the user print as one ``error: ...`` line on
stderr with exit code 2; Ctrl-C exits with 130; ``calibrate`` exits with 1 when no trial met
the budget (the closest trial is still written).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from quicksilver.errors import QuicksilverError

DEFAULT_MODEL = "smollm2-135m"  # same as quicksilver.models.loading.DEFAULT_MODEL
DATASET_NAMES = ("wikitext-2", "wikitext-103", "c4")
MB = 1024**2


class _Parser(argparse.ArgumentParser):
    """argparse with the same one-line ``error:`` format as every other failure."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- validation helpers


def _require_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise QuicksilverError(f"{flag} must be a positive integer, got {value}")


def _check_dtype(name: str) -> Any:
    from quicksilver.models.loading import parse_dtype

    return parse_dtype(name)


def _check_json(path: str | None) -> Path | None:
    from quicksilver.eval.report import check_output_path

    return check_output_path(path) if path else None


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


# ---------------------------------------------------------------- generate


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise QuicksilverError(f"cannot read prompt file {path}: {err}") from err
        from_file = [line for line in lines if line.strip()]
        if not from_file:
            raise QuicksilverError(f"prompt file {path} has no non-empty lines")
        prompts.extend(from_file)
    if not prompts:
        raise QuicksilverError("give a prompt with --prompt TEXT or --prompt-file FILE")
    if any(not p for p in prompts):
        raise QuicksilverError("prompts must not be empty")
    return prompts


def _encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


class _Streamer:
    """Prints one row's text as it grows: decode all ids so far, print the new suffix.

    Decoding the whole sequence (not token by token) keeps multi-token characters and the
    tokenizer's spacing rules right; a trailing U+FFFD means a character is still incomplete,
    so that suffix waits for the next token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = ""

    def add(self, token: int) -> None:
        self.ids.append(token)
        self._emit(final=False)

    def finish(self) -> None:
        self._emit(final=True)
        sys.stdout.write("\n")
        sys.stdout.flush()

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and (not text.startswith(self.printed) or text.endswith("\ufffd")):
            return
        # At the end, print whatever follows the part already shown, even if decoding the
        # whole sequence changed earlier characters (e.g. cleaned-up spaces).
        shared = len(os.path.commonprefix([text, self.printed]))
        sys.stdout.write(text[shared:])
        sys.stdout.flush()
        self.printed = text


def cmd_generate(args: argparse.Namespace) -> int:
    from quicksilver.runtime.sampling import SamplingConfig

    _require_positive(max_new_tokens=args.max_new_tokens, threads=args.threads)
    sampling = SamplingConfig(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    _check_dtype(args.dtype)
    json_path = _check_json(args.json)
    prompts = _read_prompts(args)
    policy = _load_policy_args(args)
    _set_threads(args.threads)

    from quicksilver.accounting import Meter
    from quicksilver.eval.report import write_json_atomic
    from quicksilver.models import loading
    from quicksilver.runtime.engine import Engine

    loading.resolve(args.model)
    loaded = loading.load(args.model, args.dtype)
    tokenizer = loaded.text_tokenizer()
    if args.chat and not getattr(tokenizer, "chat_template", None):
        _say("note: the tokenizer has no chat template; using the prompt as-is")
    token_ids = [_encode_prompt(tokenizer, p, args.chat) for p in prompts]
    policy = _with_target_speedup(policy, args, loaded.model.config)
    engine = Engine(loaded.model, policy=policy)
    if not policy.is_off:
        _say(f"policy: {policy.describe()}")

    streamer = _Streamer(tokenizer) if len(prompts) == 1 else None
    on_token: Callable[[int, int], None] | None = (
        (lambda row, token: streamer.add(token)) if streamer is not None else None
    )
    with Meter() as meter:
        result = engine.generate(token_ids, args.max_new_tokens, sampling, on_token=on_token)
    completions = [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
    if streamer is not None:
        streamer.finish()
    else:
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            print(f"--- [{i}] {prompt}")
            print(completion)

    flops = result.flops
    # tokens that went in: the left-padded prompt block, then one token per row per step
    processed = len(token_ids) * (max(map(len, token_ids)) + result.decode_steps)
    flops_per_token = flops.get("total", 0) / processed
    _say(
        f"[{result.new_tokens} tokens, prefill {result.prefill_seconds:.2f} s, "
        f"decode {result.decode_tokens_per_s:.1f} tok/s, "
        f"{flops_per_token / 1e9:.2f} GFLOP/token]"
    )
    if json_path is not None:
        write_json_atomic(
            json_path,
            {
                "model": args.model,
                "dtype": args.dtype,
                "chat": args.chat,
                "policy": policy.to_config(),
                "sampling": {
                    "temperature": sampling.temperature,
                    "top_k": sampling.top_k,
                    "top_p": sampling.top_p,
                    "seed": sampling.seed,
                },
                "prompts": prompts,
                "completions": completions,
                "tokens": result.tokens,
                "prompt_tokens": result.prompt_tokens,
                "new_tokens": result.new_tokens,
                "max_new_tokens": args.max_new_tokens,
                "prefill_seconds": result.prefill_seconds,
                "decode_seconds": result.decode_seconds,
                "decode_steps": result.decode_steps,
                "decode_tokens_per_s": result.decode_tokens_per_s,
                "flops": flops,
                "flops_per_token": flops_per_token,
                "load_seconds": loaded.load_seconds,
                "peak_rss_bytes": meter.peak_rss_bytes,
            },
        )
    return 0


# ---------------------------------------------------------------- eval


def _eval_split(dataset: str, split: str | None) -> str:
    from quicksilver.eval.datasets import DATASETS

    if split is not None:
        return split
    splits = DATASETS[dataset].local
    return "test" if "test" in splits else next(iter(splits))


def _check_generation_length(max_new_tokens: int) -> None:
    if max_new_tokens < 2:
        raise QuicksilverError(
            f"--max-new-tokens must be at least 2 to compare generation, got {max_new_tokens}: "
            "the first token comes from the prompt's forward, speed and FLOPs are measured on "
            "the decode steps after it"
        )


def _generation_prompts(args: argparse.Namespace) -> tuple[list[str], str]:
    """Up to ``--prompts`` prompts and where they came from: the ``--field`` (default
    ``prompt``) of each line of ``--jsonl``, else the first sentence of each paragraph of the
    chosen text (default: WikiText-2; the split depends on the command)."""
    from quicksilver.eval import datasets
    from quicksilver.eval.generation import wikitext_prompts

    if args.jsonl:
        if args.max_chars is not None:
            raise QuicksilverError("--max-chars applies to text, not to prompts from --jsonl")
        documents = datasets.read_jsonl_documents(args.jsonl, args.field or "prompt")
        prompts, name = [d.strip() for d in documents if d.strip()][: args.prompts], args.jsonl
    else:
        text = _load_eval_text(args)
        prompts, name = wikitext_prompts(text.text, args.prompts), text.name
    if not prompts:
        raise QuicksilverError(f"no prompts found in {name}; check --jsonl and --field")
    return prompts, name


def _load_eval_text(args: argparse.Namespace) -> Any:
    from quicksilver.eval import datasets

    if args.text_file:
        return datasets.load_text_file(args.text_file, max_chars=args.max_chars)
    if args.jsonl:
        return datasets.load_jsonl(args.jsonl, args.field or "text", max_chars=args.max_chars)
    dataset = args.dataset or "wikitext-2"
    return datasets.load_eval_text(
        dataset,
        _eval_split(dataset, args.split),
        data_dir=Path(args.data_dir) if args.data_dir else None,
        max_chars=args.max_chars,
    )


def _check_eval_args(args: argparse.Namespace) -> None:
    _check_text_and_windows(args)
    for flag in args.compare or []:
        if flag != "transformers":
            raise QuicksilverError(f"cannot compare with {flag!r}; the only choice is transformers")


def _check_text_and_windows(args: argparse.Namespace) -> None:
    """The text source and window options that `eval` and `calibrate` share."""
    _require_positive(
        context=args.context,
        stride=args.stride,
        batch_size=args.batch_size,
        max_windows=args.max_windows,
    )
    if args.context is None:  # `calibrate --measure generation`: no windows
        _check_text_args(args)
        return
    if args.context < 2:
        raise QuicksilverError(f"--context must be at least 2 tokens, got {args.context}")
    if args.stride > args.context:
        raise QuicksilverError(
            f"--stride ({args.stride}) must not exceed --context ({args.context})"
        )
    _check_text_args(args)


def _check_text_args(args: argparse.Namespace) -> None:
    """The text source options (`_add_text_args`)."""
    _require_positive(max_chars=args.max_chars, threads=args.threads)
    if args.dataset is not None and args.dataset not in DATASET_NAMES:
        raise QuicksilverError(
            f"unknown dataset {args.dataset!r}; choose from {', '.join(DATASET_NAMES)} "
            "(or pass --text-file / --jsonl)"
        )
    if args.field is not None and not args.jsonl:
        raise QuicksilverError("--field only applies to --jsonl")
    if (args.split is not None or args.data_dir is not None) and (args.text_file or args.jsonl):
        raise QuicksilverError("--split and --data-dir only apply to --dataset")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise QuicksilverError(f"--data-dir {args.data_dir} is not a directory")


def _precise(value: float) -> str:
    """Quality figures keep four decimals: differences between runs live there."""
    return f"{value:.4f}" if math.isfinite(value) else "-"


def cmd_eval(args: argparse.Namespace) -> int:
    _check_eval_args(args)
    dtype = _check_dtype(args.dtype)
    json_path = _check_json(args.json)
    _set_threads(args.threads)

    from quicksilver.eval.perplexity import (
        evaluate_perplexity,
        tokenize_text,
        transformers_perplexity,
    )
    from quicksilver.eval.report import format_table, write_json_atomic
    from quicksilver.models import loading
    from quicksilver.runtime.engine import Engine

    policy = _load_policy_args(args)
    source = loading.resolve(args.model)
    text = _load_eval_text(args)
    loaded = loading.load(args.model, dtype)
    token_ids = tokenize_text(loaded.text_tokenizer(), text.text)
    result = evaluate_perplexity(
        Engine(loaded.model, policy=policy),
        token_ids,
        context=args.context,
        stride=args.stride,
        text=text,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        max_windows=args.max_windows,
    )
    report: dict[str, Any] = {
        "model": args.model,
        "dtype": args.dtype,
        "dataset": text.name,
        "n_documents": text.n_documents,
        "batch_size": args.batch_size,
        "max_windows": args.max_windows,
        "policy": policy.to_config(),
        **result.to_dict(),
    }
    rows: list[list[Any]] = [
        ["perplexity", _precise(result.ppl)],
        ["bits per byte", _precise(result.bits_per_byte)],
        ["word perplexity", _precise(result.word_ppl)],
        ["scored tokens", result.tokens],
        ["windows", result.windows],
        ["GFLOP/token (counted)", result.flops_per_token / 1e9],
        ["GFLOP/token (dense)", result.dense_flops_per_token / 1e9],
        ["FLOP fraction of dense", result.flops_per_token / result.dense_flops_per_token],
        ["seconds", result.seconds],
        ["peak RSS (MB)", result.peak_rss_bytes / MB],
    ]
    if args.compare:
        if not args.no_progress:
            _say("computing transformers' perplexity on the same tokens")
        from quicksilver.eval.throughput import load_transformers_model

        hf_model = load_transformers_model(source, dtype)
        start = time.perf_counter()
        hf_ppl, hf_tokens = transformers_perplexity(
            hf_model,
            token_ids,
            context=args.context,
            stride=args.stride,
            max_windows=args.max_windows,
        )
        report["transformers"] = {
            "ppl": hf_ppl,
            "tokens": hf_tokens,
            "seconds": time.perf_counter() - start,
            "ppl_relative_difference": result.ppl / hf_ppl - 1,
        }
        rows.append(["transformers perplexity", _precise(hf_ppl)])
        rows.append(["relative difference", f"{result.ppl / hf_ppl - 1:+.2e}"])
    print(
        f"{args.model} ({args.dtype}) on {text.name}, context {args.context}, stride {args.stride}"
        f", policy: {policy.describe()}"
    )
    print(format_table(["metric", "value"], rows))
    if json_path is not None:
        write_json_atomic(json_path, report)
    return 0


# ---------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    _require_positive(
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        threads=args.threads,
    )
    if args.new_tokens < 2:
        raise QuicksilverError("--new-tokens must be at least 2 (decode starts after the first)")
    for batch in args.batch_sizes:
        if batch < 1:
            raise QuicksilverError(f"--batch-sizes must be positive integers, got {batch}")
    compare = tuple(args.compare or ())
    for name in compare:
        if name != "transformers":
            raise QuicksilverError(f"cannot compare with {name!r}; the only choice is transformers")
    _check_dtype(args.dtype)
    json_path = _check_json(args.json)
    _set_threads(args.threads)

    from quicksilver.eval.report import write_json_atomic
    from quicksilver.eval.throughput import run_bench
    from quicksilver.models import loading

    loading.resolve(args.model)
    report = run_bench(
        args.model,
        args.dtype,
        batch_sizes=tuple(args.batch_sizes),
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        compare=compare,
        repeats=args.repeats,
        progress=not args.no_progress,
    )
    print(bench_summary(report))
    if json_path is not None:
        write_json_atomic(json_path, report)
    return 0


def bench_summary(report: dict[str, Any]) -> str:
    from quicksilver.eval.report import format_table
    from quicksilver.eval.throughput import summary_rows

    machine = report["machine"]
    settings = report["settings"]
    headers, rows = summary_rows(report)
    load = report["load_average_1min"]["start"]
    busy = f", load average {load:.1f} at start" if load is not None else ""
    return "\n".join(
        [
            f"{report['model']} ({report['dtype']}), {report['threads']} threads, "
            f"prompt {settings['prompt_tokens']} tokens, {settings['new_tokens']} new tokens, "
            f"{settings['statistic']}",
            f"machine: {machine['memory_bandwidth_gb_s']:.1f} GB/s read bandwidth, "
            f"{machine['matmul_gflops']:.0f} GFLOP/s {report['dtype']} matmul{busy}",
            format_table(headers, rows),
            "speedup = quicksilver tokens/s / transformers tokens/s",
        ]
    )


# ---------------------------------------------------------------- models


def cmd_models(args: argparse.Namespace) -> int:
    from quicksilver.eval.report import format_table
    from quicksilver.models import loading

    rows = []
    for name, alias in loading.MODEL_ALIASES.items():
        try:
            where = loading.resolve(name).path
            installed = "yes"
        except QuicksilverError:
            where, installed = f"run `{alias.install_hint}`", "no"
        label = name + (" (default)" if name == loading.DEFAULT_MODEL else "")
        rows.append([label, installed, where])
    print(format_table(["model", "installed", "path / how to install"], rows))
    print("Any local Hugging Face model directory, .gguf file or hub id also works as --model.")
    return 0


# ---------------------------------------------------------------- policies and calibration


def _load_policy_args(args: argparse.Namespace) -> Any:
    """The policy given by --policy (preset or file) and --set overrides, checked before any
    model is loaded (with --target-speedup where the command has it)."""
    from quicksilver.policies import load_policy

    speedup = getattr(args, "target_speedup", None)
    if speedup is not None and not speedup >= 1:
        raise QuicksilverError(f"--target-speedup must be >= 1, got {speedup}")
    return load_policy(args.policy, args.set)


def _with_target_speedup(policy: Any, args: argparse.Namespace, config: Any) -> Any:
    """``policy`` with its SkipDecode schedule replaced by one derived from --target-speedup
    over --max-new-tokens (unchanged without the option); needs the model's shape."""
    if args.target_speedup is None:
        return policy
    from quicksilver.policies.skipdecode import schedule_for_speedup
    from quicksilver.policies.stack import Policy

    schedule = schedule_for_speedup(config, args.target_speedup, args.max_new_tokens)
    return Policy([*(p for p in policy.policies if p.name != "skipdecode"), schedule])


def _parse_fraction(text: str, flag: str) -> float:
    """'1%' -> 0.01, '0.01' -> 0.01."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise QuicksilverError(f"{flag} expects a number or a percentage, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise QuicksilverError(f"{flag} must be a finite number >= 0, got {text!r}")
    return value


def cmd_policies(args: argparse.Namespace) -> int:
    from quicksilver.policies import PRESETS, REGISTRY

    for name, cls in REGISTRY.items():
        print(f"{name}: {cls.summary}")
        for param, kind, default in cls.parameters():
            print(f"    {param:16s} {kind:24s} default {json.dumps(default)}")
    print("presets (--policy NAME):")
    for name, config in PRESETS.items():
        print(f"    {name:10s} {json.dumps(config)}")
    print(
        "A policy is a JSON/YAML mapping {mechanism: {parameter: value}}; pass it with "
        "--policy FILE and adjust with --set mechanism.parameter=value."
    )
    return 0


# What each calibration measure reads, with its defaults; the other measure's options are errors.
MEASURE_OPTIONS = {
    "perplexity": {"context": 1024, "stride": 512, "max_windows": 16},
    "generation": {"prompts": 32, "max_new_tokens": 32},
}


def _resolve_measure_options(args: argparse.Namespace) -> None:
    """Fill the chosen measure's defaults; reject options only the other measure reads."""
    for measure, options in MEASURE_OPTIONS.items():
        for name, default in options.items():
            if measure == args.measure:
                if getattr(args, name) is None:
                    setattr(args, name, default)
            elif getattr(args, name) is not None:
                flag = "--" + name.replace("_", "-")
                raise QuicksilverError(
                    f"{flag} applies to --measure {measure}, not --measure {args.measure}"
                )
    if args.batch_size is None:
        args.batch_size = 8 if args.measure == "generation" else 2


def cmd_calibrate(args: argparse.Namespace) -> int:
    _resolve_measure_options(args)
    _check_text_and_windows(args)
    _require_positive(steps=args.steps)
    if (args.max_ppl_increase is None) == (args.flop_fraction is None):
        raise QuicksilverError("give exactly one budget: --max-ppl-increase or --flop-fraction")
    increase = (
        _parse_fraction(args.max_ppl_increase, "--max-ppl-increase")
        if args.max_ppl_increase is not None
        else None
    )
    if increase is not None and increase >= 1 and not args.max_ppl_increase.strip().endswith("%"):
        raise QuicksilverError(
            f"--max-ppl-increase {args.max_ppl_increase} would allow +{increase:.0%}; give a "
            "fraction (0.01) or a percentage (1%)"
        )
    fraction = (
        _parse_fraction(args.flop_fraction, "--flop-fraction")
        if args.flop_fraction is not None
        else None
    )
    if fraction is not None and not 0 < fraction <= 1:
        raise QuicksilverError(f"--flop-fraction must be in (0, 1], got {args.flop_fraction}")
    if not (args.text_file or args.jsonl):
        args.split = args.split or "validation"
        if args.split == "test":
            _say("warning: calibrating on a test split; evaluate the result on other text")
    json_path = _check_json(args.json)
    output = Path(args.output)
    if output.suffix not in (".json", ".yaml", ".yml"):
        raise QuicksilverError(f"--output must end in .json, .yaml or .yml, got {args.output}")
    from quicksilver.eval.report import check_output_path

    check_output_path(output)
    dtype = _check_dtype(args.dtype)
    generation = args.measure == "generation"
    if generation:
        _check_generation_length(args.max_new_tokens)
    _require_positive(prompts=args.prompts)
    base = _load_policy_args(args)
    from quicksilver.eval import calibrate as calibration

    calibration.check_calibratable(base, compute_budget=fraction is not None, decode=generation)
    _set_threads(args.threads)
    from quicksilver.models import loading
    from quicksilver.policies.files import write_policy_file
    from quicksilver.policies.stack import Policy
    from quicksilver.runtime.engine import Engine

    if generation:
        prompts, text_name = _generation_prompts(args)
    else:
        text = _load_eval_text(args)
        text_name = text.name
    loaded = loading.load(args.model, dtype)
    tokenizer = loaded.text_tokenizer()
    base.check_model(loaded.model.config)
    if generation:
        measure = calibration.generation_measure(
            loaded.model,
            [_encode_prompt(tokenizer, p, False) for p in prompts],
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )
        setting = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens}
    else:
        from quicksilver.eval.perplexity import tokenize_text

        measure = calibration.perplexity_measure(
            Engine(loaded.model),
            tokenize_text(tokenizer, text.text),
            context=args.context,
            stride=args.stride,
            batch_size=args.batch_size,
            max_windows=args.max_windows,
        )
        setting = {"context": args.context, "stride": args.stride, "max_windows": args.max_windows}
    result = calibration.calibrate(
        measure, base, max_ppl_increase=increase, flop_fraction=fraction, steps=args.steps
    )
    chosen = Policy.from_config(result.policy)
    record = {
        "policy": result.policy,
        "calibration": {
            "model": args.model,
            "dtype": args.dtype,
            "measure": args.measure,
            "dataset": text_name,
            "batch_size": args.batch_size,
            **setting,
            **{k: v for k, v in result.to_dict().items() if k != "policy"},
        },
    }
    from quicksilver.eval.report import write_json_atomic

    if output.suffix == ".json":
        write_json_atomic(output, record)
    else:  # the policy alone; the trials go to --json if asked
        write_policy_file(chosen, output)
    if json_path is not None:
        write_json_atomic(json_path, record)
    verdict = "meets" if result.met else "does NOT meet"
    t = result.chosen
    print(
        f"chosen: {chosen.describe()}\n"
        f"factor {result.factor:.4g} {verdict} the budget on {text_name}"
        f"{' (continuations)' if generation else ''}: ppl {t.ppl:.4f} "
        f"({t.ppl_increase:+.2%} vs dense {result.dense_ppl:.4f}), FLOPs {t.flop_fraction:.3f} "
        f"of dense; written to {output}"
    )
    return 0 if result.met else 1


def cmd_eval_gen(args: argparse.Namespace) -> int:
    _require_positive(
        prompts=args.prompts, max_new_tokens=args.max_new_tokens, threads=args.threads
    )
    for size in args.batch_sizes:
        _require_positive(batch_sizes=size)
    _check_generation_length(args.max_new_tokens)
    _check_text_args(args)
    dtype = _check_dtype(args.dtype)
    json_path = _check_json(args.json)
    policy = _load_policy_args(args)
    _set_threads(args.threads)

    from quicksilver.eval.generation import evaluate_generation
    from quicksilver.eval.report import format_table, write_json_atomic
    from quicksilver.models import loading

    prompts, _ = _generation_prompts(args)
    loaded = loading.load(args.model, dtype)
    tokenizer = loaded.text_tokenizer()
    ids = [_encode_prompt(tokenizer, p, False) for p in prompts]
    policy = _with_target_speedup(policy, args, loaded.model.config)
    if policy.is_off:
        _say("note: the policy is dense; both sides will agree exactly")
    _say(f"policy: {policy.describe()}; {len(prompts)} prompts")
    results = [
        evaluate_generation(
            loaded.model, policy, ids, max_new_tokens=args.max_new_tokens, batch_size=size
        )
        for size in args.batch_sizes
    ]
    rows = [
        [
            r.batch_size,
            f"{r.agreement:.3f}",
            f"{r.rouge_l:.3f}",
            f"{r.dense_ppl_of_policy:.2f}",
            f"{r.dense_ppl_of_dense:.2f}",
            f"{r.policy_tokens_per_s:.1f}",
            f"{r.dense_tokens_per_s:.1f}",
            f"{r.policy_flops_per_token / r.dense_flops_per_token:.3f}",
            f"{r.policy_prefill_flops_per_token / r.dense_prefill_flops_per_token:.3f}",
        ]
        for r in results
    ]
    headers = ["batch", "agreement", "ROUGE-L", "dense ppl (policy)", "dense ppl (dense)"]
    headers += ["tok/s policy", "tok/s dense", "decode FLOPs/dense", "prompt FLOPs/dense"]
    print(format_table(headers, rows))
    if json_path is not None:
        write_json_atomic(
            json_path,
            {
                "model": args.model,
                "dtype": args.dtype,
                "policy": policy.to_config(),
                "prompts": prompts,
                "results": [r.to_dict() for r in results],
            },
        )
    return 0


# ---------------------------------------------------------------- parser and entry point


def _add_text_args(parser: argparse.ArgumentParser, *, split_help: str, field: str) -> None:
    """Where the text (or prompts) come from (checked by `_check_text_args`)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", help=f"{' | '.join(DATASET_NAMES)} (default: wikitext-2)")
    source.add_argument("--text-file", metavar="FILE", help="a UTF-8 text file instead")
    source.add_argument("--jsonl", metavar="FILE", help="a JSONL file (one document a line)")
    parser.add_argument("--field", help=f"JSONL field holding the text (default: {field})")
    parser.add_argument("--split", help=split_help)
    parser.add_argument("--data-dir", metavar="DIR", help="where the datasets live")
    parser.add_argument("--max-chars", type=int, metavar="N", help="cut the text to N characters")


def _add_text_and_window_args(
    parser: argparse.ArgumentParser,
    *,
    split_help: str,
    batch_size: int | None,
    max_windows: int | None,
    field: str = "text",
    batch_help: str = "windows per forward pass",
    resolved_later: bool = False,
) -> None:
    """The text source and window options of `eval` and `calibrate` (checked together by
    `_check_text_and_windows`). ``resolved_later``: no defaults here (the command fills them
    in, `calibrate` per measure); the help still names them."""
    _add_text_args(parser, split_help=split_help, field=field)
    context, stride = (None, None) if resolved_later else (1024, 512)
    parser.add_argument(
        "--context", type=int, default=context, help="window length in tokens (default: 1024)"
    )
    parser.add_argument(
        "--stride", type=int, default=stride, help="tokens between window starts (default: 512)"
    )
    parser.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    shown = max_windows or (16 if resolved_later else None)
    parser.add_argument(
        "--max-windows",
        type=int,
        default=None if resolved_later else max_windows,
        metavar="N",
        help="stop after N windows" + (f" (default: {shown})" if shown else ""),
    )


def _add_policy_args(parser: argparse.ArgumentParser, target_speedup: bool = False) -> None:
    parser.add_argument(
        "--policy",
        metavar="FILE|PRESET",
        help="adaptive policy: a JSON/YAML file or a preset (dense, paper); default dense",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="M.P=V",
        help="set a policy parameter, e.g. halting.min_layer=20 (repeatable)",
    )
    if target_speedup:
        parser.add_argument(
            "--target-speedup",
            type=float,
            metavar="X",
            help="add a SkipDecode schedule whose decode FLOPs per token (LM head included, "
            "averaged over the decode steps) are 1/X of dense",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="quicksilver",
        description="Run frozen pretrained LLMs with quicksilver's engine: generate text, "
        "measure perplexity and benchmark throughput against transformers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    common = _Parser(add_help=False)
    common.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="short name, .gguf file, HF model dir or hub id (default: %(default)s)",
    )
    common.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    common.add_argument("--json", metavar="PATH", help="also write the results as JSON here")

    gen = sub.add_parser("generate", parents=[common], help="generate text from prompts")
    gen.add_argument(
        "--dtype", default="bfloat16", help="float32 or bfloat16 (default: %(default)s)"
    )
    gen.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    gen.add_argument("--prompt-file", metavar="FILE", help="one prompt per line, run as a batch")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    gen.add_argument("--seed", type=int, help="seed for reproducible sampling")
    gen.add_argument(
        "--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template"
    )
    _add_policy_args(gen, target_speedup=True)
    gen.set_defaults(handler=cmd_generate)

    ev = sub.add_parser("eval", parents=[common], help="sliding-window perplexity")
    ev.add_argument("--dtype", default="float32", help="float32 or bfloat16 (default: %(default)s)")
    _add_text_and_window_args(
        ev,
        split_help="dataset split (default: test, or validation for c4)",
        batch_size=1,
        max_windows=None,
    )
    ev.add_argument(
        "--compare",
        action="append",
        metavar="transformers",
        help="also compute transformers' perplexity on the same tokens",
    )
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_policy_args(ev)
    ev.set_defaults(handler=cmd_eval)

    cal = sub.add_parser(
        "calibrate",
        parents=[common],
        help="search a policy's thresholds for a quality or compute budget",
        description="Scale every threshold of a policy by one factor and search the factor on "
        "a calibration split. Writes the chosen policy (and, in .json, every trial); exits 1 "
        "when no trial met the budget.",
    )
    cal.add_argument(
        "--dtype", default="float32", help="float32 or bfloat16 (default: %(default)s)"
    )
    cal.add_argument("--output", required=True, metavar="FILE", help="chosen policy (.json/.yaml)")
    budget = cal.add_mutually_exclusive_group()
    budget.add_argument("--max-ppl-increase", metavar="X", help="quality budget, e.g. 1%% or 0.01")
    budget.add_argument(
        "--flop-fraction", metavar="F", help="compute budget: counted FLOPs / dense, e.g. 0.6"
    )
    cal.add_argument(
        "--measure",
        choices=["perplexity", "generation"],
        default="perplexity",
        help="perplexity: sliding-window perplexity of the text (what `eval` reports); "
        "generation: the dense model's perplexity of the policy's greedy continuations of "
        "prompts taken from the text, with decode FLOPs (what `eval-gen` reports)",
    )
    _add_text_and_window_args(
        cal,
        split_help="calibration split (default: validation)",
        batch_size=None,
        max_windows=None,
        field="text; prompt with --measure generation",
        batch_help="windows per forward pass (default 2), or prompts per batch with "
        "--measure generation (default 8)",
        resolved_later=True,
    )
    cal.add_argument("--prompts", type=int, help="--measure generation: prompts (default: 32)")
    cal.add_argument(
        "--max-new-tokens",
        type=int,
        help="--measure generation: tokens per continuation (default: 32)",
    )
    cal.add_argument("--steps", type=int, default=6, help="bisection steps after bracketing")
    _add_policy_args(cal)
    cal.set_defaults(handler=cmd_calibrate)

    eg = sub.add_parser(
        "eval-gen", parents=[common], help="what a policy changes in generated text, vs dense"
    )
    eg.add_argument(
        "--dtype", default="bfloat16", help="float32 or bfloat16 (default: %(default)s)"
    )
    eg.add_argument(
        "--prompts",
        type=int,
        default=32,
        help="number of prompts: the first sentences of the text's paragraphs, or JSONL "
        "lines (default: 32)",
    )
    _add_text_args(eg, split_help="dataset split (default: test)", field="prompt")
    eg.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], metavar="N")
    eg.add_argument("--max-new-tokens", type=int, default=32)
    _add_policy_args(eg, target_speedup=True)
    eg.set_defaults(handler=cmd_eval_gen)

    pol = sub.add_parser("policies", help="list the adaptive mechanisms and their parameters")
    pol.set_defaults(handler=cmd_policies)

    bench = sub.add_parser("bench", parents=[common], help="prefill/decode throughput")
    bench.add_argument(
        "--dtype", default="bfloat16", help="float32 or bfloat16 (default: %(default)s)"
    )
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], metavar="N")
    bench.add_argument("--prompt-tokens", type=int, default=128)
    bench.add_argument("--new-tokens", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    bench.add_argument(
        "--compare",
        action="append",
        metavar="transformers",
        help="also benchmark transformers in the same process",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress messages")
    bench.set_defaults(handler=cmd_bench)

    models = sub.add_parser("models", help="list known model names and whether installed")
    models.set_defaults(handler=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args)
    except QuicksilverError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `quicksilver generate ... | head`
        sys.stderr.close()
        return 141


if __name__ == "__main__":
    sys.exit(main())
