"""Throughput: our engine and Hugging Face transformers timed the same way, in one process.

Both engines get the same prompts, dtype, batch sizes and thread count. Each measurement is
preceded by a warm-up run and repeated; we keep the best (fastest) repeat, because on a shared
CPU the slow outliers come from other processes, not from the code being measured.

Prefill tokens/s is prompt tokens processed / prefill time; decode tokens/s is batch x tokens
generated after the first / decode time. For transformers, prefill is ``generate`` with one new
token (prompt forward + first token, like our prefill) and decode is a full greedy ``generate``
of exactly ``new_tokens`` minus that prefill time.

Machine limits put the numbers in context: decode on CPU is bound by reading the weights from
memory once per step, prefill by matmul throughput.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from quicksilver.accounting import cpu_name
from quicksilver.api import load
from quicksilver.bench.machine import (
    fractions_of_limit,
    load_average,
    measure_matmul_flops,
    measure_memory_bandwidth,
)
from quicksilver.errors import QuicksilverError
from quicksilver.eval.report import summary_record
from quicksilver.integrations.hf_reference import quiet_transformers
from quicksilver.models import loading
from quicksilver.runtime.cache import check_cache_fits
from quicksilver.runtime.engine import Engine
from quicksilver.runtime.generate import generate, prefill_block

ENGINE_NAME = "quicksilver"
TRANSFORMERS_NAME = "transformers"
LLAMA_CPP_NAME = "llama.cpp"
COMPARABLE = (TRANSFORMERS_NAME, LLAMA_CPP_NAME)
STATISTIC = "best"  # which repeat is reported: the fastest

# Used when the WikiText-2 validation text is not available; any fixed English text will do.
FALLBACK_PARAGRAPH = (
    "The river rises in the hills above the old market town and runs south through farmland, "
    "woods and a string of small villages before it reaches the estuary. In the eighteenth "
    "century its banks were lined with mills that ground corn, fulled cloth and later drove the "
    "first spinning machines. Most of the mills closed when steam power arrived, and the "
    "buildings that survive now house workshops, a museum and several homes. A footpath follows "
    "the water for most of its length, crossing it on stone bridges that date from the same "
    "period, and walkers can still see the channels that once fed the wheels. "
)


# ---------------------------------------------------------------- prompts


def bench_prompts(tokenizer: Any, rows: int, prompt_tokens: int) -> tuple[list[list[int]], str]:
    """`rows` different prompts of exactly `prompt_tokens` tokens, and where the text came from.

    Consecutive slices of the WikiText-2 validation text, so reruns see the same tokens; a fixed
    built-in paragraph stands in when that data is missing.
    """
    needed = rows * prompt_tokens
    try:
        from quicksilver.eval.datasets import load_eval_text

        # ~4 characters per token in English; ask for generous slack.
        text = load_eval_text("wikitext-2", "validation", max_chars=needed * 8 + 1000).text
        origin = "wikitext-2/validation"
    except QuicksilverError:
        text, origin = "", "built-in paragraph"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    if len(ids) < needed:
        paragraph = tokenizer(FALLBACK_PARAGRAPH, add_special_tokens=False)["input_ids"]
        ids = (paragraph * (needed // len(paragraph) + 1))[:needed]
        origin = "built-in paragraph"
    return [ids[r * prompt_tokens : (r + 1) * prompt_tokens] for r in range(rows)], origin


# ---------------------------------------------------------------- measuring


def _rows(prompts_token_ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    if len(prompts_token_ids) < batch_size:
        raise QuicksilverError(f"need {batch_size} prompts, got {len(prompts_token_ids)}")
    rows = [list(p) for p in prompts_token_ids[:batch_size]]
    if len({len(r) for r in rows}) != 1 or not rows[0]:
        raise QuicksilverError("benchmark prompts must be non-empty and of equal length")
    return rows


def _check_counts(new_tokens: int, repeats: int) -> None:
    if new_tokens < 2:
        raise QuicksilverError("new_tokens must be at least 2 (decode starts after the first)")
    if repeats < 1:
        raise QuicksilverError(f"repeats must be at least 1, got {repeats}")


def bench_engine(
    engine: Engine,
    prompts_token_ids: Sequence[Sequence[int]],
    batch_size: int,
    new_tokens: int,
    repeats: int,
) -> dict[str, Any]:
    """Prefill and decode throughput of our engine on the first `batch_size` prompts.

    Stop tokens are disabled so every repeat generates exactly `new_tokens` per row. Also
    records the FLOPs counted for one prefill, to relate prefill speed to the matmul limit.
    """
    _check_counts(new_tokens, repeats)
    rows = _rows(prompts_token_ids, batch_size)
    counter = engine.counter
    before = counter.total
    prefill_block(engine, rows, new_tokens)  # warm-up for prefill, and its FLOP count
    prefill_flops = counter.total - before
    generate(engine, rows, new_tokens, ignore_eos=True)  # warm-up for decode
    prefill, decode = [], []
    for _ in range(repeats):
        result = generate(engine, rows, new_tokens, ignore_eos=True)
        prefill.append(result.prefill_seconds)
        decode.append(result.decode_seconds)
    out = summary_record(batch_size, len(rows[0]), new_tokens, prefill, decode)
    out["prefill_flops"] = prefill_flops
    return out


def bench_transformers(
    hf_model: Any,
    prompts_token_ids: Sequence[Sequence[int]],
    batch_size: int,
    new_tokens: int,
    repeats: int,
) -> dict[str, Any]:
    """The same measurement for a transformers model, through its own ``generate``."""
    _check_counts(new_tokens, repeats)
    rows = _rows(prompts_token_ids, batch_size)
    input_ids = torch.tensor(rows, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)
    eos = hf_model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos

    def run(n: int) -> float:
        start = time.perf_counter()
        out = hf_model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=pad if pad is not None else 0,
        )
        seconds = time.perf_counter() - start
        if out.shape[1] != input_ids.shape[1] + n:
            raise QuicksilverError(
                f"transformers generated {out.shape[1] - input_ids.shape[1]} tokens instead of {n}"
            )
        return seconds

    with quiet_transformers(), torch.inference_mode():
        run(1)
        run(new_tokens)  # warm-ups
        prefill, full = [], []
        for _ in range(repeats):
            prefill.append(run(1))
            full.append(run(new_tokens))
    # Decode = full generation minus the prefill it contains (the fastest of each).
    best_prefill = min(prefill)
    decode = [max(f - best_prefill, 1e-9) for f in full]
    return summary_record(batch_size, len(rows[0]), new_tokens, prefill, decode)


# ---------------------------------------------------------------- the whole run


def check_bench_args(
    batch_sizes: Sequence[int],
    prompt_tokens: int,
    new_tokens: int,
    compare: Sequence[str],
    repeats: int,
    weights: Sequence[str] = ("bfloat16",),
) -> None:
    """Reject settings `run_bench` cannot measure, before anything is loaded."""
    if not batch_sizes:
        raise QuicksilverError("give at least one batch size")
    bad = [b for b in batch_sizes if b < 1]
    if bad:
        raise QuicksilverError(f"batch sizes must be positive, got {bad[0]}")
    if prompt_tokens < 1:
        raise QuicksilverError(f"prompt_tokens must be positive, got {prompt_tokens}")
    _check_counts(new_tokens, repeats)
    unknown = [c for c in compare if c not in COMPARABLE]
    if unknown:
        raise QuicksilverError(
            f"cannot compare with {unknown[0]!r}; choose from: {', '.join(COMPARABLE)}"
        )
    if not weights:
        raise QuicksilverError("give at least one weight format")


def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One engine's measurement in a fresh process (``bench.worker``)."""
    done = subprocess.run(
        [sys.executable, "-m", "quicksilver.bench.worker"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        tail = " ".join(done.stderr.strip().splitlines()[-3:])[-300:]
        raise QuicksilverError(
            f"the {spec['engine']} measurement failed (exit {done.returncode}): {tail}"
        ) from None
    if "error" in report:
        raise QuicksilverError(f"the {spec['engine']} measurement failed: {report['error']}")
    return report


def _checked_prompts(
    model: str,
    dtype: str,
    batch_sizes: Sequence[int],
    prompt_tokens: int,
    new_tokens: int,
    llama_cpp_possible: bool,
    say: Callable[[str], None],
) -> tuple[list[list[int]], str]:
    """The prompts every engine gets, and where their text came from; loading the model here
    also checks it (and that the largest batch's cache fits) before any worker starts."""
    say(f"reading the tokenizer of {model}")
    llm = load(model, dtype=dtype)  # prompts need the tokenizer; checked loading, too
    check_cache_fits(
        llm.config,
        llm.model.dtype,
        rows=max(batch_sizes),
        length=prompt_tokens + new_tokens - 1,
        fix="use smaller --batch-sizes, --prompt-tokens or --new-tokens",
    )
    if llm.tokenizer is None:
        raise QuicksilverError(f"{llm.name} ships no tokenizer; bench builds its prompts from text")
    if not llama_cpp_possible:
        raise QuicksilverError("llama.cpp runs GGUF files only; bench a .gguf model to compare")
    return bench_prompts(llm.tokenizer, max(batch_sizes), prompt_tokens)


def _worker_specs(
    common: dict[str, Any],
    weights: Sequence[str],
    compile: bool,
    also_compiled: Sequence[str],
    head_weights: str | None,
    group_size: int,
    compare: Sequence[str],
    gguf_path: str,
) -> list[dict[str, Any]]:
    """One worker spec per measurement: our engine in each weight format (eager, compiled or
    both), then each comparison engine."""
    specs = [
        {
            **common,
            "engine": ENGINE_NAME,
            "weights": fmt,
            "head_weights": head_weights,
            "group_size": group_size if "int4" in (fmt, head_weights) else None,
            "compile": step_compiled,
        }
        for fmt in weights
        for step_compiled in sorted({compile, compile or fmt in also_compiled})
    ]
    if TRANSFORMERS_NAME in compare:
        specs.append({**common, "engine": TRANSFORMERS_NAME})
    if LLAMA_CPP_NAME in compare:
        specs.append({**common, "engine": LLAMA_CPP_NAME, "gguf": gguf_path})
    return specs


def _measure_engines(
    specs: list[dict[str, Any]], bandwidth: float, matmul: float, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Run every spec's worker, one after the other, and place each result against the
    machine's limits."""
    engines = []
    for spec in specs:
        say(f"{spec['engine']} {spec.get('weights') or ''}".strip())
        report = _run_worker(spec)
        say(
            f"  {report['label']}: "
            + ", ".join(
                f"batch {b} decode {r['decode_tokens_per_s']:.1f} tok/s"
                for b, r in report["results"].items()
            )
        )
        for result in report["results"].values():
            result["fraction_of_limit"] = fractions_of_limit(
                result, report["weight_bytes"], result.get("prefill_flops", 0), bandwidth, matmul
            )
        engines.append({"engine": spec["engine"], **report})
    return engines


def run_bench(
    model: str = loading.DEFAULT_MODEL,
    dtype: str = "bfloat16",
    weights: Sequence[str] = ("bfloat16",),
    compile: bool = False,
    batch_sizes: Sequence[int] = (1, 8),
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    compare: Sequence[str] = (TRANSFORMERS_NAME,),
    repeats: int = 3,
    progress: bool = True,
    head_weights: str | None = None,
    group_size: int = 32,
    threads: int | None = None,
    also_compiled: Sequence[str] = (),
) -> dict[str, Any]:
    """Benchmark our engine in each weight format (and transformers, llama.cpp) and return a
    JSON-able report. Every engine runs in a process of its own, one after the other, on the
    same prompts, batch sizes and threads; ratios are taken within this one run.
    ``compile`` compiles every format's decode step; ``also_compiled`` adds a compiled run of
    the formats it names beside their eager ones."""
    check_bench_args(batch_sizes, prompt_tokens, new_tokens, compare, repeats, weights)
    say: Callable[[str], None] = (
        (lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True))
        if progress
        else (lambda msg: None)
    )
    load_at_start = load_average()
    source = loading.resolve(model)
    llama_cpp_possible = LLAMA_CPP_NAME not in compare or source.kind == "gguf"
    prompts, origin = _checked_prompts(
        model, dtype, batch_sizes, prompt_tokens, new_tokens, llama_cpp_possible, say
    )

    say("measuring memory bandwidth and matmul throughput")
    bandwidth = measure_memory_bandwidth()
    matmul = measure_matmul_flops(loading.parse_dtype(dtype))
    common = {
        "model": model,
        "dtype": dtype,
        "prompts": prompts,
        "batch_sizes": list(batch_sizes),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": threads,
    }
    specs = _worker_specs(
        common, weights, compile, also_compiled, head_weights, group_size, compare, source.path
    )
    engines = _measure_engines(specs, bandwidth, matmul, say)

    settings = {
        "batch_sizes": list(batch_sizes),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "weights": list(weights),
        "compile": compile,
        "statistic": f"{STATISTIC} of {repeats} after one warm-up run",
        "prompts": origin,
    }
    machine = {"memory_bandwidth_gb_s": bandwidth / 1e9, "matmul_gflops": matmul / 1e9}
    # What the workers ran with, as each reports it (the spec's count when one does not).
    used_threads = engines[0].get("threads") or threads or torch.get_num_threads()
    return _report(source, dtype, used_threads, load_at_start, settings, machine, engines)


def _report(
    source: loading.ModelSource,
    dtype: str,
    threads: int,
    load_at_start: float | None,
    settings: dict[str, Any],
    machine: dict[str, float],
    engines: list[dict[str, Any]],
) -> dict[str, Any]:
    """The run's JSON-able report: the software and machine beside the measurements, and
    how each was taken."""
    import transformers

    return {
        "model": source.name,
        "model_source": {"kind": source.kind, "path": source.path},
        "dtype": dtype,
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        # Other processes competing for the cores make every number here slower.
        "load_average_1min": {"start": load_at_start, "end": load_average()},
        "settings": {
            **settings,
            "decoding": "greedy, stop tokens ignored",
            "isolation": "each engine in a fresh process, one after the other",
            "transformers_timing": "prefill = generate(max_new_tokens=1); decode = "
            "generate(max_new_tokens=min_new_tokens=new_tokens) - prefill",
        },
        "machine": machine,
        "engines": engines,
        "fraction_of_limit_definition": {
            "decode": "weight bytes per decode step / step time / memory bandwidth",
            "prefill": "counted prefill FLOPs / prefill time / matmul FLOP/s (ours only)",
        },
    }


def summary_rows(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per (batch size, engine): throughput, compile time, memory, the share of the
    machine's bandwidth, and decode speed relative to each comparison engine."""
    others = [e for e in report["engines"] if e["engine"] != ENGINE_NAME]
    headers = [
        "engine",
        "batch",
        "prefill tok/s",
        "decode tok/s",
        "compile s",
        "peak RSS MB",
        "decode % bandwidth",
    ] + [f"decode / {e['engine']}" for e in others]
    rows: list[list[Any]] = []
    for batch in (str(b) for b in report["settings"]["batch_sizes"]):
        for engine in report["engines"]:
            r = engine["results"][batch]
            ratios = [
                _ratio(r["decode_tokens_per_s"], e["results"][batch]["decode_tokens_per_s"])
                if engine["engine"] == ENGINE_NAME
                else None
                for e in others
            ]
            rows.append(
                [
                    engine["label"],
                    int(batch),
                    r["prefill_tokens_per_s"],
                    r["decode_tokens_per_s"],
                    r.get("compile_seconds"),
                    engine["peak_rss_bytes"] / 1024**2,
                    100 * r["fraction_of_limit"]["decode"],
                    *ratios,
                ]
            )
    return headers, rows


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0
