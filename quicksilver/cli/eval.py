"""``quicksilver eval``: sliding-window perplexity of a text, optionally next to
transformers' own on the same tokens, or (``--windows documents``) each document scored in
lm-evaluation-harness's rolling windows, which reproduces the harness's wikitext figures."""

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
from quicksilver.cli.generate import check_group_size, mark_group_size_default
from quicksilver.cli.inputs import (
    check_model_args,
    load_eval_text,
    load_llm,
    load_policy_args,
    stream_ids,
)
from quicksilver.cli.options import (
    add_compare,
    add_dtype,
    add_policy_args,
    add_text_args,
    add_window_args,
)
from quicksilver.errors import QuicksilverError
from quicksilver.eval import datasets
from quicksilver.eval.datasets import EvalText
from quicksilver.eval.perplexity import PerplexityResult, evaluate_rolling_perplexity
from quicksilver.eval.report import format_table
from quicksilver.integrations.hf_reference import load_transformers_model, transformers_perplexity
from quicksilver.integrations.llama_cpp_reference import llama_cpp_perplexity
from quicksilver.lm_eval_tasks import wikitext_documents
from quicksilver.models.loading import parse_dtype, resolve
from quicksilver.outputs import write_json_atomic
from quicksilver.policies import Policy

NAME = "eval"
MB = 1024**2
WINDOWS = ("sliding", "documents")
DEFAULT_STRIDE = 512

# What --compare accepts: the references that compute the same windows independently.
COMPARE = ("transformers", "llama.cpp")


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        NAME,
        parents=[common],
        help="sliding-window perplexity",
        description="Perplexity, bits per byte and word perplexity of a text through windows "
        "of --context tokens every --stride tokens (each token scored once), with the FLOPs "
        "counted in the same run. With --windows documents, each document is scored on its "
        "own as lm-evaluation-harness does (see --windows).",
    )
    add_dtype(parser, "float32")
    add_text_args(
        parser, split_help="dataset split (default: test, or validation for c4)", field="text"
    )
    add_window_args(parser, batch_size=1, batch_help="windows per forward pass (default: 1)")
    parser.set_defaults(stride=None)  # DEFAULT_STRIDE for sliding windows; see _resolve_windows
    parser.add_argument(
        "--windows",
        choices=WINDOWS,
        default="sliding",
        help="sliding (default): the whole text as one stream, windows of --context tokens "
        "every --stride tokens. documents: lm-evaluation-harness's document-level rolling "
        "windows, as its wikitext task and `quicksilver lm-eval --tasks qs_wikitext2_doc` "
        "score: each document (a WikiText article, a --jsonl line, a whole --text-file) on its "
        "own, its first token predicted from BOS (else EOS), in windows reading at most "
        "--context tokens (the harness's max_length); word perplexity, byte perplexity and "
        "bits per byte with the harness's per-document word and byte counts. No --stride, "
        "--max-windows or --compare there.",
    )
    add_compare(
        parser,
        "also compute transformers' (and, for a GGUF file, llama.cpp's) perplexity on the same "
        "tokens and windows",
        COMPARE,
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_policy_args(parser)
    mark_group_size_default(parser)
    parser.set_defaults(handler=run)


def _precise(value: float) -> str:
    """Quality figures keep four decimals: differences between runs live there."""
    return f"{value:.4f}" if math.isfinite(value) else "-"


def _resolve_windows(args: argparse.Namespace) -> None:
    """--stride's default, and the sliding-window options that --windows documents refuses."""
    if args.windows == "sliding":
        args.stride = DEFAULT_STRIDE if args.stride is None else args.stride
        return
    refused = [
        option
        for option, value in (
            ("--stride", args.stride),
            ("--max-windows", args.max_windows),
            ("--compare", args.compare),
        )
        if value is not None
    ]
    if refused:
        raise QuicksilverError(
            f"{', '.join(refused)} applies to --windows sliding, not --windows documents "
            "(rolling windows read --context tokens and score every token once)"
        )
    args.stride = args.context


def run(args: argparse.Namespace) -> int:
    check_group_size(args, [args.weights])
    _resolve_windows(args)
    check_windows(args)
    check_text_args(args)
    check_compare(args.compare, COMPARE)
    if "llama.cpp" in (args.compare or ()) and resolve(args.model).kind != "gguf":
        raise QuicksilverError("--compare llama.cpp needs a .gguf model (llama.cpp reads the file)")
    check_model_args(args)
    dtype = parse_dtype(args.dtype)
    policy = load_policy_args(args)
    json_path = check_output(args.json, args)
    set_threads(args.threads)

    text = load_eval_text(args)
    llm = load_llm(args)
    check_windows_fit(llm, args, text.n_bytes)
    n_documents = text.n_documents
    if args.windows == "documents":
        documents = _documents(args, text)
        n_documents = len(documents)
        result = _score_documents(llm, documents, policy, args)
    else:
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
        "weights": llm.weights.to_dict(),
        "dataset": text.name,
        "windowing": args.windows,
        "n_documents": n_documents,
        "batch_size": args.batch_size,
        "max_windows": args.max_windows,
        "policy": policy.to_config(),
        **result.to_dict(),
    }
    rows: list[list[Any]] = [
        ["perplexity", _precise(result.ppl)],
        ["bits per byte", _precise(result.bits_per_byte)],
        ["word perplexity", _precise(result.word_ppl)],
        *([["byte perplexity", _precise(result.byte_ppl)]] if args.windows == "documents" else []),
        ["scored tokens", result.tokens],
        ["windows", result.windows],
        ["GFLOP/token (counted)", result.flops_per_token / 1e9],
        ["GFLOP/token (dense)", result.dense_flops_per_token / 1e9],
        ["FLOP fraction of dense", result.flops_per_token / result.dense_flops_per_token],
        ["seconds", result.seconds],
        ["peak RSS (MB)", result.peak_rss_bytes / MB],
    ]
    for name in dict.fromkeys(args.compare or ()):
        reference = _reference(name, llm, dtype, text.text, args, result.ppl)
        report[name] = reference
        rows.append([f"{name} perplexity", _precise(reference["ppl"])])
        rows.append(["relative difference", f"{reference['ppl_relative_difference']:+.2e}"])
    windows = (
        f"stride {args.stride}"
        if args.windows == "sliding"
        else f"{n_documents} documents in rolling windows"
    )
    show(
        f"{args.model} ({args.dtype}) on {text.name}, context {args.context}, {windows}, "
        f"policy: {policy.describe()}"
    )
    show(format_table(["metric", "value"], rows))
    if json_path is not None:
        write_json_atomic(json_path, report)
    return 0


def _documents(args: argparse.Namespace, text: EvalText) -> list[str]:
    """The documents --windows documents scores, as the harness's tasks see them: WikiText's
    articles (``lm_eval_tasks.wikitext_documents``, the qs_wikitext2_doc split), each line of
    --jsonl, or the whole --text-file."""
    if args.text_file:
        return [text.text]
    if args.jsonl:
        if args.max_chars is not None:
            raise QuicksilverError(
                "--max-chars would cut a --jsonl document in two; with --windows documents, "
                "shorten the file instead"
            )
        return datasets.read_jsonl_documents(args.jsonl, args.field or "text")
    name = args.dataset or "wikitext-2"
    if datasets.DATASETS[name].kind != "wikitext":
        raise QuicksilverError(
            f"--windows documents cannot find the documents of {name} in its joined text; "
            "pass its JSONL file with --jsonl (one document a line)"
        )
    return wikitext_documents(text.text.splitlines(keepends=True))


def _score_documents(
    llm: qs.LLM, documents: list[str], policy: Policy, args: argparse.Namespace
) -> PerplexityResult:
    """Each document tokenised as the harness's ``loglikelihood_rolling`` requests are (one
    raw stream, no special tokens) and scored in its rolling windows under ``policy``."""
    ids = [stream_ids(llm, document) for document in documents]
    with llm.use(policy):
        return evaluate_rolling_perplexity(
            llm.engine,
            ids,
            prefix_token=llm.prefix_token_id,
            max_length=args.context,
            texts=documents,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )


def _reference(
    name: str, llm: qs.LLM, dtype: torch.dtype, text: str, args: argparse.Namespace, ppl: float
) -> dict[str, Any]:
    """transformers' or llama.cpp's perplexity of the same token stream over the same
    windows (llama.cpp reads the GGUF file itself, in its own formats and kernels)."""
    if not args.no_progress:
        say(f"computing {name}'s perplexity on the same tokens")
    windows = dict(context=args.context, stride=args.stride, max_windows=args.max_windows)
    start = time.perf_counter()
    if name == "transformers":
        hf_model = load_transformers_model(llm.source, dtype)
        start = time.perf_counter()
        ref_ppl, ref_tokens = transformers_perplexity(hf_model, stream_ids(llm, text), **windows)
    else:
        ref_ppl, ref_tokens = llama_cpp_perplexity(
            llm.source.path, stream_ids(llm, text), threads=torch.get_num_threads(), **windows
        )
    return {
        "ppl": ref_ppl,
        "tokens": ref_tokens,
        "seconds": time.perf_counter() - start,
        "ppl_relative_difference": ppl / ref_ppl - 1,
    }
