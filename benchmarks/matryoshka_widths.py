"""Matryoshka widths on the real model: decode speed, memory and bytes read per width.

Loads SmolLM2-135M in bfloat16 and, in one process, measures decode tokens/s at batch 1 and
8 (a 128-token WikiText-2 prompt per row, 64 generated tokens, greedy, no stop) for the dense
model and for ``matryoshka: {fixed_bits: 8 | 4 | 2}`` (kernel auto: int4 bit planes; width 2
is SIMULATED, a 4-bit plane holding 2-bit values). Every setting is timed ``--repeats`` times,
interleaved with the others so that load from other processes hits them alike, and the best
run is kept. Then perplexity on the first windows of WikiText-2 test (context 512, stride 256).

Writes docs/results/matryoshka-widths.md and .json.

    .venv/bin/python benchmarks/matryoshka_widths.py
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import quicksilver as qs
from quicksilver import quant
from quicksilver.eval.datasets import load_eval_text
from quicksilver.models import formats
from quicksilver.policies.matryoshka import prepared_bytes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "results"
MB = 1024 * 1024

SETTINGS: list[tuple[str, dict[str, Any] | None]] = [
    ("dense bf16", None),
    ("width 8 (hi + lo planes)", {"matryoshka": {"fixed_bits": 8}}),
    ("width 4 (hi plane)", {"matryoshka": {"fixed_bits": 4}}),
    ("width 2 (SIMULATED: 4-bit plane)", {"matryoshka": {"fixed_bits": 2}}),
]


def prompts_from(ids: list[int], rows: int, length: int) -> list[list[int]]:
    """``rows`` consecutive, non-overlapping ``length``-token slices of the text."""
    return [ids[i * length : (i + 1) * length] for i in range(rows)]


def decode_speed(llm: qs.LLM, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    out = llm.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    return {
        "decode_tokens_per_s": out.decode_tokens_per_s,
        "decode_seconds": out.decode_seconds,
        "prefill_seconds": out.prefill_seconds,
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (the docs' commands are checked
    against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ppl-windows", type=int, default=4)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    raw = argv if argv is not None else sys.argv[1:]
    command = ".venv/bin/python benchmarks/matryoshka_widths.py" + (
        " " + shlex.join(raw) if raw else ""
    )

    llm = qs.load("smollm2-135m", dtype="bfloat16")
    config = llm.model.config
    text = load_eval_text("wikitext-2", "test").text
    ids = llm.encode(text[:200_000])
    prompts = {b: prompts_from(ids, b, args.prompt_tokens) for b in args.batches}

    results: dict[str, dict[str, Any]] = {name: {"policy": spec} for name, spec in SETTINGS}
    dense_layer_bytes = llm.model.layer_weight_bytes()
    for name, spec in SETTINGS:
        entry = results[name]
        with llm.use(spec) as policy:
            formats.kernel_log.clear()
            llm.generate(prompts[1][0][:16], max_new_tokens=2, ignore_eos=True)  # warm up
            if spec is None:
                entry["extra_bytes"] = 0
                entry["bytes_per_token"] = config.n_layers * dense_layer_bytes
            else:
                bits = spec["matryoshka"]["fixed_bits"]
                mech = policy.get("matryoshka")
                entry["extra_bytes"] = prepared_bytes(llm.model)
                entry["bytes_per_token"] = config.n_layers * mech.layer_weight_bytes(config, bits)
                entry["simulated"] = bits in quant.SIMULATED_BITS
            entry["kernel_log"] = {
                k: v for k, v in formats.kernel_log.items() if k.startswith("matryoshka")
            }
    for _ in range(args.repeats):
        for name, spec in SETTINGS:
            with llm.use(spec):
                for b in args.batches:
                    run = decode_speed(llm, prompts[b], args.new_tokens)
                    best = results[name].setdefault(f"batch{b}", run)
                    if run["decode_tokens_per_s"] > best["decode_tokens_per_s"]:
                        results[name][f"batch{b}"] = run
            print(name, {b: results[name][f"batch{b}"] for b in args.batches}, flush=True)
    for name, spec in SETTINGS:
        start = time.perf_counter()
        ppl = llm.perplexity(
            text, context=512, stride=256, max_windows=args.ppl_windows, policy=spec
        )
        results[name]["ppl"] = ppl.ppl
        results[name]["ppl_tokens"] = ppl.tokens
        results[name]["ppl_seconds"] = time.perf_counter() - start
        print(name, "ppl", ppl.ppl, flush=True)

    meta = {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
        "model": "smollm2-135m, bfloat16",
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "perplexity": f"WikiText-2 test, context 512, stride 256, first {args.ppl_windows} windows",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "matryoshka-widths.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2) + "\n"
    )
    (args.out / "matryoshka-widths.md").write_text(report(meta, results, args.batches))
    print(report(meta, results, args.batches))


def report(meta: dict[str, Any], results: dict[str, dict[str, Any]], batches: list[int]) -> str:
    head = "| setting | " + " | ".join(f"decode tok/s, batch {b}" for b in batches)
    head += " | layer bytes read per token (MB) | extra memory (MB) | ppl |"
    rule = "|---" * (len(batches) + 4) + "|"
    lines = [head, rule]
    for name, r in results.items():
        speeds = " | ".join(f"{r[f'batch{b}']['decode_tokens_per_s']:.1f}" for b in batches)
        lines.append(
            f"| {name} | {speeds} | {r['bytes_per_token'] / MB:.1f} | "
            f"{r['extra_bytes'] / MB:.1f} | {r['ppl']:.3f} |"
        )
    logs = "\n".join(
        f"- {name}: {r['kernel_log']}" for name, r in results.items() if r["kernel_log"]
    )
    return f"""# Matryoshka widths: int4 bit planes on SmolLM2-135M (CPU)

Command: `{meta["command"]}` ({meta["date"]}, torch {meta["torch"]}, {meta["threads"]} threads;
1-minute load average {meta["load_average_1min"]:.1f} at the end on {meta["cpu_count"]} CPUs
(above the thread count, other processes competed); the settings were timed interleaved,
best of {meta["repeats"]}).

Decode: a {meta["prompt_tokens"]}-token WikiText-2 prompt per row, {meta["new_tokens"]} greedy
tokens, decode tokens/s after the prompt's forward. Perplexity: {meta["perplexity"]}.
Bytes read: the block linears of all layers for one token (the LM head and embeddings are
the same for every setting and left out); width 8 reads the hi and lo planes (a byte a
weight), width 4 the hi plane only. **Width 2 is simulated**: no 2-bit kernel exists here,
so its values sit in a 4-bit plane: 2-bit arithmetic, 4-bit bytes and speed. Extra memory:
what the policy adds to the model (the planes, their scales and zeros); the dense bf16
weights stay for full-precision tokens.

{chr(10).join(lines)}

Kernel calls during a short warm-up generation (every block linear ran on the planes):
{logs}
"""


if __name__ == "__main__":
    main()
