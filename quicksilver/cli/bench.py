"""``quicksilver bench``: prefill and decode throughput of our engine (and of transformers,
with --compare) in one process, next to the machine's measured limits."""

from __future__ import annotations

import argparse
from typing import Any

from quicksilver.api import weight_format
from quicksilver.bench import throughput
from quicksilver.cli.checks import check_compare, check_output, require_positive, set_threads
from quicksilver.cli.console import show
from quicksilver.cli.generate import check_group_size, mark_group_size_default
from quicksilver.cli.inputs import int4_group_size
from quicksilver.cli.options import add_compare, add_format_options
from quicksilver.eval.report import format_table
from quicksilver.models.loading import DTYPES, parse_dtype
from quicksilver.outputs import write_json_atomic

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
    names = ", ".join(dict.fromkeys(str(d).removeprefix("torch.") for d in DTYPES.values()))
    parser.add_argument(
        "--dtype", default="bfloat16", help=f"activations: {names} (default: %(default)s)"
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        default=None,
        metavar="FORMAT",
        help="one engine per weight format: the dtype, int8, int4 (default: the dtype)",
    )
    add_format_options(parser)
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
    add_compare(
        parser,
        "also benchmark transformers (bf16, its eager attention path) or llama.cpp "
        "(llama-cpp-python, the same GGUF file) in the same run",
        choices=throughput.COMPARABLE,
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress messages")
    mark_group_size_default(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    check_group_size(args, args.weights or [])
    check_compare(args.compare, throughput.COMPARABLE)
    require_positive(
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats
    )
    for size in args.batch_sizes:
        require_positive(batch_sizes=size)
    dtype = parse_dtype(args.dtype)
    formats = args.weights or [str(dtype).removeprefix("torch.")]
    for fmt in formats:
        weight_format(dtype, fmt, args.head_weights, int4_group_size(args, fmt))
    settings = dict(
        batch_sizes=tuple(args.batch_sizes),
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        compare=tuple(args.compare or ()),
        repeats=args.repeats,
        weights=tuple(formats),
    )
    throughput.check_bench_args(**settings)
    json_path = check_output(args.json, args)
    set_threads(args.threads)

    report = throughput.run_bench(
        args.model,
        dtype=args.dtype,
        compile=args.compile,
        head_weights=args.head_weights,
        group_size=args.group_size,
        threads=args.threads,
        progress=not args.no_progress,
        **settings,
    )
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
            f"{report['model']} ({report['dtype']} activations), {report['threads']} threads, "
            f"prompt {settings['prompt_tokens']} tokens, {settings['new_tokens']} new tokens, "
            f"{settings['statistic']}, {settings['isolation']}",
            f"machine: {machine['memory_bandwidth_gb_s']:.1f} GB/s read bandwidth, "
            f"{machine['matmul_gflops']:.0f} GFLOP/s {report['dtype']} matmul{busy}",
            format_table(headers, rows),
            "decode / X = quicksilver decode tokens/s divided by X's, same batch size",
        ]
    )
