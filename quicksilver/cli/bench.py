"""``quicksilver bench``: prefill and decode throughput of our engine (and of transformers,
with --compare) in one process, next to the machine's measured limits; with --speculative,
verified decoding by each drafting method against plain decoding (``bench.speculative``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from quicksilver.api import weight_format
from quicksilver.bench import speculative, throughput
from quicksilver.cli.checks import check_compare, check_output, require_positive, set_threads
from quicksilver.cli.console import show
from quicksilver.cli.generate import check_group_size, mark_group_size_default
from quicksilver.cli.inputs import (
    check_speculative_policy,
    int4_group_size,
    load_llm,
    load_policy_args,
)
from quicksilver.cli.options import add_compare, add_format_options, add_policy_args
from quicksilver.errors import QuicksilverError
from quicksilver.eval.report import format_table
from quicksilver.models.loading import DTYPES, parse_dtype
from quicksilver.outputs import write_json_atomic
from quicksilver.runtime.speculative.settings import speculative_config

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
    parser.add_argument(
        "--speculative",
        nargs="+",
        metavar="METHOD",
        help="instead: verified decoding by each METHOD (ngram, layers, planes, auto) against "
        "plain decoding on grounded and open prompts built from --documents WikiText-2 slices "
        "of --prompt-tokens tokens; end-to-end tokens/s, exactness, acceptance",
    )
    parser.add_argument(
        "--speculative-tokens",
        type=int,
        metavar="N",
        help="most tokens drafted per step (default: each method's own)",
    )
    parser.add_argument(
        "--documents",
        type=int,
        default=4,
        metavar="N",
        help="documents per task with --speculative (default: %(default)s)",
    )
    add_policy_args(parser)
    mark_group_size_default(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.speculative:
        return run_speculative(args)
    if args.policy or args.set or args.speculative_tokens is not None:
        raise QuicksilverError("--policy, --set and --speculative-tokens apply to --speculative")
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
        threads=torch.get_num_threads(),  # --threads as set_threads capped it
        progress=not args.no_progress,
        **settings,
    )
    show(summary(report))
    if json_path is not None:
        write_json_atomic(json_path, report)
    return 0


def run_speculative(args: argparse.Namespace) -> int:
    """``--speculative``: each method against plain decoding (``bench.speculative``)."""
    for method in args.speculative:
        speculative_config({"method": method, "num_tokens": args.speculative_tokens})
    if args.compare:
        raise QuicksilverError(
            "--compare is not measured with --speculative; benchmarks/speculative.py runs "
            "llama.cpp's and transformers' prompt lookup on the same prompts"
        )
    if args.weights and len(args.weights) > 1:
        raise QuicksilverError("--speculative measures one weight format at a time")
    require_positive(
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, documents=args.documents
    )
    for size in args.batch_sizes:
        require_positive(batch_sizes=size)
    policy = load_policy_args(args)
    for method in args.speculative:
        check_speculative_policy(policy, {"method": method})
    json_path = check_output(args.json, args)
    set_threads(args.threads)
    args.weights = args.weights[0] if args.weights else None
    llm = load_llm(args)
    if llm.tokenizer is None:
        raise QuicksilverError("--speculative builds text prompts: this model ships no tokenizer")
    say = None if args.no_progress else (lambda message: print(message, file=sys.stderr))
    documents, origin = speculative.default_documents(llm, args.documents, args.prompt_tokens)
    report = speculative.measure(
        llm,
        speculative.task_prompts(llm, documents),
        args.speculative,
        args.batch_sizes,
        args.new_tokens,
        num_tokens=args.speculative_tokens,
        policy=policy,
        progress=say,
    )
    show(
        "\n".join(
            [
                f"{llm!r}, {torch.get_num_threads()} threads, {args.documents} documents "
                f"from {origin} x {len(speculative.TASKS)} tasks, {args.new_tokens} new "
                f"tokens, greedy, policy {policy.to_config() or 'dense'}",
                format_table(list(speculative.TABLE_COLUMNS), speculative.table_rows(report)),
                "speedup = end-to-end tokens/s over plain decoding's on the same prompts; "
                "identical = rows whose tokens equal plain greedy decoding's",
                *speculative.plan_lines(report["plan"]),
            ]
        )
    )
    if json_path is not None:
        write_json_atomic(json_path, {"model": args.model, "dtype": args.dtype, **report})
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
