"""``quicksilver eval``: sliding-window perplexity of a text, optionally next to
transformers' own on the same tokens."""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch

import quicksilver as qs
from quicksilver.cli.checks import (
    check_compare,
    check_output,
    check_text_args,
    check_windows,
    check_windows_fit,
    set_threads,
)
from quicksilver.cli.console import say, show
from quicksilver.cli.inputs import load_eval_text, load_policy_args, stream_ids
from quicksilver.cli.options import (
    add_compare,
    add_dtype,
    add_policy_args,
    add_text_args,
    add_window_args,
)
from quicksilver.eval.report import format_table, write_json_atomic
from quicksilver.integrations.hf_reference import load_transformers_model, transformers_perplexity
from quicksilver.models.loading import parse_dtype

NAME = "eval"
MB = 1024**2


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        NAME,
        parents=[common],
        help="sliding-window perplexity",
        description="Perplexity, bits per byte and word perplexity of a text through windows "
        "of --context tokens every --stride tokens (each token scored once), with the FLOPs "
        "counted in the same run.",
    )
    add_dtype(parser, "float32")
    add_text_args(
        parser, split_help="dataset split (default: test, or validation for c4)", field="text"
    )
    add_window_args(parser, batch_size=1, batch_help="windows per forward pass (default: 1)")
    add_compare(parser, "also compute transformers' perplexity on the same tokens")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_policy_args(parser)
    parser.set_defaults(handler=run)


def _precise(value: float) -> str:
    """Quality figures keep four decimals: differences between runs live there."""
    return f"{value:.4f}" if math.isfinite(value) else "-"


def run(args: argparse.Namespace) -> int:
    check_windows(args)
    check_text_args(args)
    check_compare(args.compare)
    dtype = parse_dtype(args.dtype)
    policy = load_policy_args(args)
    json_path = check_output(args.json, args)
    set_threads(args.threads)

    text = load_eval_text(args)
    llm = qs.load(args.model, dtype=args.dtype)
    check_windows_fit(llm, args, text.n_bytes)
    result = llm.perplexity(
        text.text,
        context=args.context,
        stride=args.stride,
        batch_size=args.batch_size,
        max_windows=args.max_windows,
        progress=not args.no_progress,
        policy=policy,
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
        reference = _transformers_reference(llm, dtype, text.text, args, result.ppl)
        report["transformers"] = reference
        rows.append(["transformers perplexity", _precise(reference["ppl"])])
        rows.append(["relative difference", f"{reference['ppl_relative_difference']:+.2e}"])
    show(
        f"{args.model} ({args.dtype}) on {text.name}, context {args.context}, stride "
        f"{args.stride}, policy: {policy.describe()}"
    )
    show(format_table(["metric", "value"], rows))
    if json_path is not None:
        write_json_atomic(json_path, report)
    return 0


def _transformers_reference(
    llm: qs.LLM, dtype: torch.dtype, text: str, args: argparse.Namespace, ppl: float
) -> dict[str, Any]:
    """transformers' perplexity of the same token stream over the same windows."""
    if not args.no_progress:
        say("computing transformers' perplexity on the same tokens")
    hf_model = load_transformers_model(llm.source, dtype)
    start = time.perf_counter()
    hf_ppl, hf_tokens = transformers_perplexity(
        hf_model,
        stream_ids(llm, text),
        context=args.context,
        stride=args.stride,
        max_windows=args.max_windows,
    )
    return {
        "ppl": hf_ppl,
        "tokens": hf_tokens,
        "seconds": time.perf_counter() - start,
        "ppl_relative_difference": ppl / hf_ppl - 1,
    }
