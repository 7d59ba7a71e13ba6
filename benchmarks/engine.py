"""Benchmark our engine against Hugging Face transformers and record the result in the docs.

Writes docs/benchmarks/engine.md (tables, the exact command, date and machine facts) and
docs/benchmarks/engine.json (everything `run_bench` measured). Both engines run in this one
process with the same prompts, dtype, batch sizes and thread count.

    .venv/bin/python benchmarks/engine_vs_transformers.py                      # bf16, batch 1 and 8
    .venv/bin/python benchmarks/engine_vs_transformers.py --dtypes bfloat16 float32
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import quicksilver as qs
from quicksilver.eval.report import format_table, write_json_atomic
from quicksilver.eval.throughput import run_bench, summary_rows

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "benchmarks"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=qs.DEFAULT_MODEL)
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["bfloat16"],
        metavar="DTYPE",
        help="one table per dtype (default: bfloat16; add float32 for both)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], metavar="N")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-compare", action="store_true", help="skip transformers")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT,
        help="where engine.md and engine.json go (default: docs/benchmarks)",
    )
    return parser.parse_args(argv)


def render_markdown(command: str, date: str, runs: list[dict[str, Any]]) -> str:
    """The human-readable record: how it was produced, on what, and the numbers."""
    first = runs[0]
    settings = first["settings"]
    lines = [
        "# Throughput: quicksilver engine vs Hugging Face transformers",
        "",
        f"Generated {date} by:",
        "",
        "```",
        command,
        "```",
        "",
        "## Machine",
        "",
        f"- CPU: {first['cpu']}, {first['threads']} torch threads",
        f"- torch {first['torch']}, transformers {first['transformers']}, Python {first['python']}",
        f"- model: `{first['model']}` ({first['model_source']['kind']}), "
        f"{first['weight_bytes'] / 1e6:.0f} MB of Linear weights in {first['dtype']}",
    ]
    for run in runs:
        load = run["load_average_1min"]
        if load["start"] is not None:
            lines.append(
                f"- 1-minute load average during the {run['dtype']} run: {load['start']:.1f} at "
                f"start, {load['end']:.1f} at end ({run['cpu_count']} CPUs; a load above the "
                "thread count means other processes competed for the cores)"
            )
    for run in runs:
        machine = run["machine"]
        lines.append(
            f"- measured limits ({run['dtype']} run): {machine['memory_bandwidth_gb_s']:.1f} GB/s "
            f"read bandwidth, {machine['matmul_gflops']:.0f} GFLOP/s {run['dtype']} matmul"
        )
    lines += [
        "",
        "## Method",
        "",
        f"- prompts: {settings['prompt_tokens']} tokens per row, different per row "
        f"({settings['prompts']}); {settings['new_tokens']} new tokens, "
        f"{settings['decoding']}",
        f"- timing: {settings['statistic']}; prefill tok/s = prompt tokens / prefill time, "
        "decode tok/s = batch x tokens after the first / decode time",
        f"- transformers: {settings['transformers_timing']}",
        "- prefill % FLOP/s: counted prefill FLOPs per second / measured matmul FLOP/s",
        "- decode % bandwidth: Linear weight bytes per decode step / step time / measured "
        "read bandwidth (a tied LM head counted once)",
        "- speedup: quicksilver tokens/s / transformers tokens/s (> 1: quicksilver faster)",
        "- peak RSS: whole process (both models are resident when comparing)",
    ]
    for run in runs:
        headers, rows = summary_rows(run)
        lines += ["", f"## {run['dtype']}", "", format_table(headers, rows, markdown=True)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir: Path = args.out_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: cannot create {out_dir}: {err}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    raw = sys.argv[1:] if argv is None else argv
    command = shlex.join([".venv/bin/python", "benchmarks/engine_vs_transformers.py", *raw])
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        runs = [
            run_bench(
                args.model,
                dtype,
                batch_sizes=tuple(args.batch_sizes),
                prompt_tokens=args.prompt_tokens,
                new_tokens=args.new_tokens,
                compare=() if args.no_compare else ("transformers",),
                repeats=args.repeats,
            )
            for dtype in args.dtypes
        ]
        write_json_atomic(out_dir / "engine.json", {"command": command, "date": date, "runs": runs})
        markdown = render_markdown(command, date, runs)
        tmp = out_dir / ".engine.md.tmp"
        tmp.write_text(markdown, encoding="utf-8")
        tmp.replace(out_dir / "engine.md")
    except qs.QuicksilverError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown)
    print(f"wrote {out_dir / 'engine.md'} and {out_dir / 'engine.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
