"""``quicksilver bench``: prefill and decode throughput of our engine (and of transformers,
with --compare) in one process, next to the machine's measured limits."""

from __future__ import annotations

import argparse
from typing import Any

import quicksilver as qs
from quicksilver.cli.checks import check_output, require_positive, set_threads
from quicksilver.cli.console import show
from quicksilver.cli.options import add_compare, add_dtype
from quicksilver.eval import throughput
from quicksilver.eval.report import format_table, write_json_atomic
from quicksilver.models.loading import parse_dtype
from quicksilver.runtime.cache import check_cache_fits

NAME = "bench"


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        NAME,
        parents=[common],
        help="prefill/decode throughput",
        description="Prefill and decode tokens/s at each batch size (greedy, stop tokens "
        "ignored), the best of --repeats runs after a warm-up, with the fraction of the "
        "machine's measured matmul throughput and memory bandwidth they reach.",
    )
    add_dtype(parser, "bfloat16")
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[1, 8],
        metavar="N",
        help="one measurement per batch size (default: 1 8)",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=128,
        metavar="N",
        help="tokens per prompt (default: %(default)s)",
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=64,
        metavar="N",
        help="tokens generated per row, at least 2 (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        metavar="N",
        help="timed runs; the best is kept (default: 3)",
    )
    add_compare(parser, "also benchmark transformers in the same process")
    parser.add_argument("--no-progress", action="store_true", help="no progress messages")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    require_positive(
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats
    )
    for size in args.batch_sizes:
        require_positive(batch_sizes=size)
    settings = dict(
        batch_sizes=tuple(args.batch_sizes),
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        compare=tuple(args.compare or ()),
        repeats=args.repeats,
    )
    throughput.check_bench_args(**settings)
    parse_dtype(args.dtype)
    json_path = check_output(args.json, args)
    set_threads(args.threads)

    llm = qs.load(args.model, dtype=args.dtype)
    check_cache_fits(
        llm.config,
        llm.model.dtype,
        rows=max(args.batch_sizes),
        length=args.prompt_tokens + args.new_tokens - 1,
        fix="use smaller --batch-sizes, --prompt-tokens or --new-tokens",
    )
    report = throughput.run_bench(llm, progress=not args.no_progress, **settings)
    show(summary(report))
    if json_path is not None:
        write_json_atomic(json_path, report)
    return 0


def summary(report: dict[str, Any]) -> str:
    """The report as a few lines and a table: settings, machine limits, one row per run."""
    machine = report["machine"]
    settings = report["settings"]
    headers, rows = throughput.summary_rows(report)
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
