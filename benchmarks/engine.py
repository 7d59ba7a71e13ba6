"""Throughput of our engine in each weight format, eager and compiled, against transformers and
llama.cpp on the same model, in one run; writes docs/benchmarks/engine.md and engine.json.

Each engine runs in a fresh process (its own peak RSS), one after the other, on the same
prompts, batch sizes and threads. llama.cpp needs the optional extra (`pip install -e
".[llama]"`, which compiles llama.cpp: about 10 minutes); without it, pass --no-llama-cpp.

    .venv/bin/python benchmarks/engine.py
    .venv/bin/python benchmarks/engine.py --weights bfloat16 int4 --compiled int4 --repeats 5
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import quicksilver as qs
from quicksilver import kernels
from quicksilver.bench.throughput import run_bench, summary_rows
from quicksilver.eval.report import format_table
from quicksilver.outputs import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "benchmarks"


def build_parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (the docs' commands are checked
    against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=qs.DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", help="activations (default: bfloat16)")
    parser.add_argument(
        "--weights", nargs="+", default=["bfloat16", "int8", "int4"], metavar="FORMAT"
    )
    parser.add_argument(
        "--compiled",
        nargs="*",
        default=["bfloat16", "int4"],
        metavar="FORMAT",
        help="formats also run with the compiled decode step (default: bfloat16 int4)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], metavar="N")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch CPU threads (default: 2, as its page was measured)",
    )
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT,
        help="where engine.md and engine.json go (default: docs/benchmarks)",
    )
    return parser


def render_markdown(command: str, date: str, run: dict[str, Any]) -> str:
    """The human-readable record: how it was produced, on what, and the numbers."""
    settings, machine, load = run["settings"], run["machine"], run["load_average_1min"]
    headers, rows = summary_rows(run)
    lines = [
        "# Throughput: quicksilver's weight formats vs transformers and llama.cpp",
        "",
        f"Generated {date} by:",
        "",
        "```",
        command,
        "```",
        "",
        "## Machine",
        "",
        f"- CPU: {run['cpu']}, {run['threads']} threads",
        f"- torch {run['torch']}, transformers {run['transformers']}, Python {run['python']}",
        f"- model: `{run['model']}` ({run['model_source']['kind']}), activations {run['dtype']}",
        f"- measured limits: {machine['memory_bandwidth_gb_s']:.1f} GB/s read bandwidth, "
        f"{machine['matmul_gflops']:.0f} GFLOP/s {run['dtype']} matmul",
    ]
    if load["start"] is not None:
        lines.append(
            f"- 1-minute load average: {load['start']:.1f} at start, {load['end']:.1f} at end "
            f"({run['cpu_count']} CPUs; above the thread count, other processes competed)"
        )
    lines += [
        "",
        "## Method",
        "",
        f"- prompts: {settings['prompt_tokens']} tokens per row, different per row "
        f"({settings['prompts']}); {settings['new_tokens']} new tokens, {settings['decoding']}",
        f"- timing: {settings['statistic']}; {settings['isolation']}; prefill tok/s = prompt "
        "tokens / prefill time, decode tok/s = batch x tokens after the first / decode time",
        "- compile s: time the compiled decode step took to compile for that batch size "
        "(inductor's on-disk cache makes later runs faster); never counted as decode time",
        "- peak RSS: the engine's own process, loading included",
        "- decode % bandwidth: the engine's weight bytes per decode step (its format: int4 "
        "codes with their scales, a GGUF file's tensors) / step time / measured bandwidth",
        f"- transformers: {settings['transformers_timing']}; bf16 with its default (sdpa) "
        "attention, its fastest CPU setting for this model in our runs (fp32 decodes slower)",
        "- llama.cpp: llama-cpp-python's low-level API on the same GGUF file, one sequence "
        "per row in one batch, greedy argmax of the returned logits each step",
        "",
        "## Results",
        "",
        format_table(headers, rows, markdown=True),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir: Path = args.out_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: cannot create {out_dir}: {err}", file=sys.stderr)
        return 2
    raw = sys.argv[1:] if argv is None else argv
    program = [".venv/bin/python", "benchmarks/engine.py", *raw]
    command = kernels.command_prefix() + shlex.join(program)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    compare = [] if args.no_transformers else ["transformers"]
    compare += [] if args.no_llama_cpp else ["llama.cpp"]
    try:
        run = run_bench(
            args.model,
            dtype=args.dtype,
            weights=tuple(args.weights),
            also_compiled=tuple(args.compiled),
            batch_sizes=tuple(args.batch_sizes),
            prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens,
            compare=tuple(compare),
            repeats=args.repeats,
            threads=args.threads,
        )
        write_json_atomic(out_dir / "engine.json", {"command": command, "date": date, "run": run})
        markdown = render_markdown(command, date, run)
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
