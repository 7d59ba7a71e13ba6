"""Checks that run before any work: flag values argparse cannot judge (signs, ranges,
combinations), outputs that could not be written or would overwrite an input, and runs that
cannot fit the model or the machine. An hour-long run should fail in its first second, and an
impossible allocation should be a sentence, not a kill by the kernel."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from quicksilver.api import LLM
from quicksilver.cli.console import say
from quicksilver.errors import QuicksilverError
from quicksilver.models.loading import MODEL_ALIASES
from quicksilver.outputs import check_output_path
from quicksilver.policies import PRESETS
from quicksilver.runtime.cache import check_cache_fits


def flag(name: str) -> str:
    """``max_new_tokens`` -> ``--max-new-tokens``."""
    return "--" + name.replace("_", "-")


def require_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise QuicksilverError(f"{flag(name)} must be a positive integer, got {value}")


def require_at_least(name: str, value: int, minimum: int, why: str) -> None:
    if value < minimum:
        raise QuicksilverError(f"{flag(name)} must be at least {minimum}{why}, got {value}")


def check_target_speedup(value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value >= 1):
        raise QuicksilverError(f"--target-speedup must be >= 1 and finite, got {value}")


def check_compare(names: Iterable[str] | None, choices: Iterable[str] = ("transformers",)) -> None:
    allowed = tuple(choices)
    for name in names or ():
        if name not in allowed:
            listed = ", ".join(allowed)
            what = "the only choice is" if len(allowed) == 1 else "choose from"
            raise QuicksilverError(f"cannot compare with {name!r}; {what} {listed}")


def utf8(text: str, what: str) -> str:
    """``text`` if it can be tokenised: command-line bytes that are not UTF-8 arrive as lone
    surrogates, which a tokenizer rejects with an obscure error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise QuicksilverError(
            f"{what} is not valid UTF-8 text (at character {err.start})"
        ) from None
    return text


def check_text_args(args: argparse.Namespace) -> None:
    """The text source options (`options.add_text_args`); the dataset name and split are
    the library's to judge, when the text is loaded (still before the model)."""
    require_positive(max_chars=args.max_chars)
    if args.field is not None and not args.jsonl:
        raise QuicksilverError("--field only applies to --jsonl")
    if (args.split is not None or args.data_dir is not None) and (args.text_file or args.jsonl):
        raise QuicksilverError("--split and --data-dir only apply to --dataset")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise QuicksilverError(f"--data-dir {args.data_dir} is not a directory")


def check_windows(args: argparse.Namespace) -> None:
    """The sliding-window options (`options.add_window_args`)."""
    require_positive(
        context=args.context,
        stride=args.stride,
        batch_size=args.batch_size,
        max_windows=args.max_windows,
    )
    if args.context < 2:
        raise QuicksilverError(f"--context must be at least 2 tokens, got {args.context}")
    if args.stride > args.context:
        raise QuicksilverError(
            f"--stride ({args.stride}) must not exceed --context ({args.context})"
        )


def set_threads(threads: int | None) -> None:
    """Use ``threads`` torch CPU threads, at most one per CPU: more only adds contention, and
    torch fails outright on absurd counts."""
    if threads is None:
        return
    require_positive(threads=threads)
    cpus = os.cpu_count() or 1
    if threads > cpus:
        say(f"note: --threads {threads} is more than the {cpus} CPUs here; using {cpus}")
        threads = cpus
    torch.set_num_threads(threads)


def input_paths(args: argparse.Namespace) -> list[str]:
    """Files the run reads, which no output may overwrite: the model (a .gguf file, or the
    files of a model directory), a policy file, the text or prompt file."""
    paths = [getattr(args, name, None) for name in ("prompt_file", "text_file", "jsonl")]
    policy = getattr(args, "policy", None)
    if policy not in PRESETS:
        paths.append(policy)
    model = getattr(args, "model", None)
    if model is not None and model not in MODEL_ALIASES:
        location = Path(model).expanduser()
        if location.is_dir():
            paths.extend(str(p) for p in location.iterdir() if p.is_file())
        else:
            paths.append(model)
    return [p for p in paths if p is not None]


def check_output(path: str | None, args: argparse.Namespace) -> Path | None:
    """``path`` (None: no such output) if the run can write it at the end without destroying
    one of its inputs."""
    return check_output_path(path, inputs=input_paths(args)) if path is not None else None


def check_windows_fit(llm: LLM, args: argparse.Namespace, n_bytes: int) -> None:
    """`check_cache_fits` for sliding windows over a text of ``n_bytes`` bytes: the rows of one
    forward are at most --batch-size windows, and each gets logits for up to --context
    positions. A token covers at least one byte, so the windows are bounded without
    tokenising the text first."""
    tokens = n_bytes + 1
    windows = 1 + max(0, -(-(tokens - args.context) // args.stride))
    rows = min(args.batch_size, windows, args.max_windows or windows)
    length = min(args.context, tokens)
    dtype = llm.model.dtype
    check_cache_fits(
        llm.config,
        dtype,
        rows=rows,
        length=length,
        extra_bytes=rows * length * llm.config.vocab_size * dtype.itemsize,
        fix="lower --batch-size or --context",
    )
