"""``quicksilver calibrate``: scale every threshold of a policy by one factor, searched on a
calibration split for a quality or a compute budget; write the chosen policy."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from quicksilver.cli.checks import (
    check_output,
    check_text_args,
    check_windows,
    check_windows_fit,
    require_at_least,
    require_positive,
    set_threads,
)
from quicksilver.cli.console import say, show
from quicksilver.cli.eval_gen import GENERATION_LENGTH_WHY
from quicksilver.cli.generate import check_group_size, mark_group_size_default
from quicksilver.cli.inputs import (
    check_model_args,
    generation_prompts,
    load_eval_text,
    load_llm,
    load_policy_args,
    stream_ids,
)
from quicksilver.cli.options import add_dtype, add_policy_args, add_text_args, add_window_args
from quicksilver.errors import QuicksilverError
from quicksilver.eval import calibrate as calibration
from quicksilver.outputs import write_json_atomic
from quicksilver.policies import Policy
from quicksilver.policies.files import write_policy_file
from quicksilver.runtime.cache import check_cache_fits

NAME = "calibrate"
# What each calibration measure reads, with its defaults; the other measure's options are errors.
MEASURE_OPTIONS: dict[str, dict[str, int]] = {
    "perplexity": {"context": 1024, "stride": 512, "max_windows": 16, "batch_size": 2},
    "generation": {"prompts": 32, "max_new_tokens": 32, "batch_size": 8},
}
# Geometric bisection halves the log-distance between two factors a step; the bracket spans a
# factor of 2, so past 52 steps the two are adjacent doubles and trials only repeat.
MAX_STEPS = 52
OUTPUT_SUFFIXES = (".json", ".yaml", ".yml")


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        NAME,
        parents=[common],
        help="search a policy's thresholds for a quality or compute budget",
        description="Scale every threshold of a policy by one factor and search the factor on "
        "a calibration split. Writes the chosen policy (and, in .json, every trial); exits 1 "
        "when no trial met the budget.",
    )
    add_dtype(parser, "float32")
    parser.add_argument(
        "--output", required=True, metavar="FILE", help="chosen policy (.json/.yaml/.yml)"
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max-ppl-increase", metavar="X", help="quality budget, e.g. 1%% or 0.01")
    budget.add_argument(
        "--flop-fraction", metavar="F", help="compute budget: counted FLOPs / dense, e.g. 0.6"
    )
    parser.add_argument(
        "--measure",
        choices=list(MEASURE_OPTIONS),
        default="perplexity",
        help="perplexity: sliding-window perplexity of the text (what `eval` reports); "
        "generation: the dense model's perplexity of the policy's greedy continuations of "
        "prompts taken from the text, with decode FLOPs (what `eval-gen` reports)",
    )
    add_text_args(
        parser,
        split_help="calibration split (default: validation)",
        field="text; prompt with --measure generation",
    )
    perplexity, generation = MEASURE_OPTIONS["perplexity"], MEASURE_OPTIONS["generation"]
    add_window_args(
        parser,
        batch_size=None,
        batch_help=f"windows per forward pass (default: {perplexity['batch_size']}), or prompts "
        f"per batch with --measure generation (default: {generation['batch_size']})",
        max_windows=perplexity["max_windows"],
        resolved_later=True,
    )
    parser.add_argument(
        "--prompts",
        type=int,
        metavar="N",
        help=f"--measure generation: prompts (default: {generation['prompts']})",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help="--measure generation: tokens per continuation "
        f"(default: {generation['max_new_tokens']})",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=6,
        metavar="N",
        help=f"bisection steps after bracketing, at most {MAX_STEPS} (default: 6)",
    )
    add_policy_args(parser)
    mark_group_size_default(parser)
    parser.set_defaults(handler=run)


def resolve_measure_options(args: argparse.Namespace) -> None:
    """Fill the chosen measure's defaults; reject options only the other measure reads."""
    for measure, options in MEASURE_OPTIONS.items():
        for name, default in options.items():
            if measure == args.measure:
                if getattr(args, name) is None:
                    setattr(args, name, default)
            elif getattr(args, name) is not None and name not in MEASURE_OPTIONS[args.measure]:
                flag = "--" + name.replace("_", "-")
                raise QuicksilverError(
                    f"{flag} applies to --measure {measure}, not --measure {args.measure}"
                )


def parse_fraction(text: str, flag: str) -> float:
    """'1%' -> 0.01, '0.01' -> 0.01."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise QuicksilverError(f"{flag} expects a number or a percentage, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise QuicksilverError(f"{flag} must be a finite number >= 0, got {text!r}")
    return value


def parse_budget(args: argparse.Namespace) -> tuple[float | None, float | None]:
    """(max perplexity increase, FLOP fraction): exactly one is given."""
    if (args.max_ppl_increase is None) == (args.flop_fraction is None):
        raise QuicksilverError("give exactly one budget: --max-ppl-increase or --flop-fraction")
    if args.max_ppl_increase is not None:
        increase = parse_fraction(args.max_ppl_increase, "--max-ppl-increase")
        if increase >= 1 and not args.max_ppl_increase.strip().endswith("%"):
            raise QuicksilverError(
                f"--max-ppl-increase {args.max_ppl_increase} would allow +{increase:.0%}; give "
                "a fraction (0.01) or a percentage (1%)"
            )
        return increase, None
    fraction = parse_fraction(args.flop_fraction, "--flop-fraction")
    if not 0 < fraction <= 1:
        raise QuicksilverError(f"--flop-fraction must be in (0, 1], got {args.flop_fraction}")
    return None, fraction


def run(args: argparse.Namespace) -> int:
    check_group_size(args, [args.weights])
    resolve_measure_options(args)
    generation = args.measure == "generation"
    if generation:
        require_positive(prompts=args.prompts, batch_size=args.batch_size)
        require_at_least("max_new_tokens", args.max_new_tokens, 2, GENERATION_LENGTH_WHY)
    else:
        check_windows(args)
    check_text_args(args)
    require_positive(steps=args.steps)
    if args.steps > MAX_STEPS:
        raise QuicksilverError(f"--steps must be at most {MAX_STEPS}, got {args.steps}")
    increase, fraction = parse_budget(args)
    if not (args.text_file or args.jsonl):
        args.split = args.split or "validation"
        if args.split == "test":
            say("warning: calibrating on a test split; evaluate the result on other text")
    output = Path(args.output)
    if output.suffix not in OUTPUT_SUFFIXES:
        raise QuicksilverError(f"--output must end in .json, .yaml or .yml, got {args.output}")
    output = check_output(args.output, args)
    json_path = check_output(args.json, args)
    if json_path is not None and json_path.resolve() == output.resolve():
        raise QuicksilverError("--json and --output name the same file; give two names")
    check_model_args(args)
    base = load_policy_args(args)
    calibration.check_calibratable(base, compute_budget=fraction is not None, decode=generation)
    set_threads(args.threads)

    if generation:
        prompts, text_name = generation_prompts(args)
    else:
        text = load_eval_text(args)
        text_name = text.name
    llm = load_llm(args)
    base.check_model(llm.config)
    if generation:
        ids = [llm.encode(p) for p in prompts]
        check_cache_fits(
            llm.config,
            llm.model.dtype,
            rows=min(args.batch_size, len(ids)),
            length=max(map(len, ids)) + args.max_new_tokens - 1,
            fix="use a smaller --batch-size or --max-new-tokens, or shorter prompts",
        )
        measure = calibration.generation_measure(
            llm.model, ids, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
        )
        setting = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens}
    else:
        check_windows_fit(llm, args, text.n_bytes)
        measure = calibration.perplexity_measure(
            llm.engine,
            stream_ids(llm, text.text),
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
    _write(output, json_path, chosen, _record(args, text_name, setting, result))
    verdict = "meets" if result.met else "does NOT meet"
    t = result.chosen
    show(
        f"chosen: {chosen.describe()}\n"
        f"factor {result.factor:.4g} {verdict} the budget on {text_name}"
        f"{' (continuations)' if generation else ''}: ppl {t.ppl:.4f} "
        f"({t.ppl_increase:+.2%} vs dense {result.dense_ppl:.4f}), FLOPs {t.flop_fraction:.3f} "
        f"of dense; written to {output}"
    )
    return 0 if result.met else 1


def _record(
    args: argparse.Namespace, text_name: str, setting: dict[str, Any], result: Any
) -> dict[str, Any]:
    """The chosen policy, and how it was chosen: what `eval --policy` reads back."""
    found = result.to_dict()
    return {
        "policy": found.pop("policy"),
        "calibration": {
            "model": args.model,
            "dtype": args.dtype,
            "measure": args.measure,
            "dataset": text_name,
            "batch_size": args.batch_size,
            **setting,
            **found,
        },
    }


def _write(output: Path, json_path: Path | None, chosen: Policy, record: dict[str, Any]) -> None:
    """A .json --output holds the whole record; YAML holds the policy alone (the trials go to
    --json if asked)."""
    if output.suffix == ".json":
        write_json_atomic(output, record)
    else:
        write_policy_file(chosen, output)
    if json_path is not None:
        write_json_atomic(json_path, record)
