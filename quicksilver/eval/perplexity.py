"""Sliding-window perplexity through our own engine, with FLOPs, time and memory from the same run.

The window plan is the Hugging Face perplexity guide's ("Perplexity of fixed-length models"):
windows of `context` tokens start every `stride` tokens, each window is a fresh forward pass, and
only the tokens not already scored by the previous window count, so every token is predicted once,
past the first window with at least `context - stride` tokens of history. The first token of the
stream has no history and is never scored.

Alongside token perplexity we report the lm-evaluation-harness figures for its wikitext task:
``bits_per_byte = nll / (n_bytes * ln 2)``, ``byte_perplexity = exp(nll / n_bytes)`` and
``word_perplexity = exp(nll / n_words)``, with bytes and words counted on the evaluated text.
The sliding window is comparable with the harness in definition, not byte-identical: the
harness scores each document with rolling windows (its first token predicted from a prefix
token), whereas the sliding window scores the raw stream as one and leaves its first token out.
``evaluate_rolling_perplexity`` scores documents the harness's way instead (its windows, its
prefix token, its per-document word and byte counts), so that it reproduces the harness's
``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte`` for the same documents
(``quicksilver eval --windows documents``; ``quicksilver lm-eval`` runs the harness itself).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm import tqdm

from quicksilver.accounting import Meter
from quicksilver.errors import QuicksilverError
from quicksilver.eval.datasets import EvalText
from quicksilver.outputs import jsonable
from quicksilver.runtime.sampling import NonFiniteLogits
from quicksilver.scoring import forced_logits, rolling_requests, score_tokens

# Rows of logits turned into log-probabilities at once: bounds the float32 temporaries of the
# loss to LOSS_CHUNK * vocab floats instead of another copy of the whole logits tensor.
LOSS_CHUNK = 256


@dataclass
class PerplexityResult:
    """One evaluation: quality, the units it was normalised by, and what it cost."""

    ppl: float
    nll_sum: float  # natural-log negative log-likelihood summed over scored tokens
    tokens: int  # scored tokens
    bits_per_byte: float  # NaN when byte/word counts are unknown (see evaluate_perplexity)
    byte_ppl: float
    word_ppl: float
    n_bytes: int  # 0 when unknown
    n_words: int
    context: int
    stride: int
    windows: int
    flops: dict[str, int]  # engine.counter.summary() delta for this run
    flops_per_token: float  # counted FLOPs / scored tokens
    dense_flops_per_token: float  # analytical dense cost of the same windows / scored tokens
    seconds: float
    peak_rss_bytes: int
    peak_extra_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: unknown byte and word figures (NaN) become null."""
        return jsonable(asdict(self))


def window_plan(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) per window; the window is tokens[begin:end] and its last
    n_scored tokens are scored.

    Follows the Hugging Face guide: windows begin every `stride` tokens, end at
    min(begin + context, n), score the tokens past the previous window's end, and the plan stops
    once a window reaches the end of the stream. Each token in 1..n-1 is scored exactly once.
    One deviation: a scored token needs at least one token of history inside its window, so with
    stride == context (no overlap) each window starts one token early; the guide instead leaves
    the first token of every window unscored.
    """
    if n_tokens < 2 or context < 2 or not 1 <= stride <= context:
        raise QuicksilverError(
            f"invalid window plan: n_tokens={n_tokens}, context={context}, stride={stride}; "
            "need n_tokens >= 2, context >= 2 and 1 <= stride <= context"
        )
    plan: list[tuple[int, int, int]] = []
    begin, prev_end = 0, 0
    while prev_end < n_tokens:
        if plan:
            begin = min(plan[-1][0] + stride, prev_end - 1)
        end = min(begin + context, n_tokens)
        plan.append((begin, end, end - max(prev_end, begin + 1)))
        prev_end = end
    return plan


def evaluate_perplexity(
    engine: Any,
    token_ids: Sequence[int] | torch.Tensor,
    *,
    context: int = 1024,
    stride: int = 512,
    text: EvalText | None = None,
    batch_size: int = 1,
    progress: bool = False,
    max_windows: int | None = None,
) -> PerplexityResult:
    """Score `token_ids` with the sliding-window plan through `engine`.

    Each window gets a fresh KV cache and one forward pass whose LM head runs only at the
    positions that predict scored tokens, so the head work (and the FLOP counter) covers exactly
    the scored tokens. With batch_size > 1, consecutive windows of the same shape share one
    forward; the first window (more scored tokens) and the last (shorter) run on their own.

    Byte and word figures need `text` (the string `token_ids` came from); without it, or when
    `max_windows` stops before the end of the stream, they are NaN and the counts 0, because the
    bytes behind the scored tokens are not known.
    """
    tokens = _as_token_tensor(token_ids)
    check_windows(
        engine.config.max_position_embeddings, len(tokens), context, stride, batch_size, max_windows
    )
    plan = window_plan(len(tokens), context, stride)
    complete = max_windows is None or max_windows >= len(plan)
    plan = plan if complete else plan[:max_windows]

    counter = engine.counter
    before = counter.summary()
    nll_sum = 0.0
    bar = tqdm(total=len(plan), disable=not progress, file=sys.stderr, unit="window")
    with Meter() as meter, bar:
        for group in _batches(plan, batch_size):
            nll_sum += _score_windows(engine, tokens, group)
            bar.update(len(group))
    flops = counter.since(before)

    scored = sum(n for _, _, n in plan)
    dense = flops["dense"]  # the runner counted the dense model's cost of the same forwards
    n_bytes = text.n_bytes if text is not None and complete else 0
    n_words = text.n_words if text is not None and complete else 0
    return _result(
        nll_sum, scored, n_bytes, n_words, context, stride, len(plan), flops, dense, meter
    )


def evaluate_rolling_perplexity(
    engine: Any,
    documents: Sequence[Sequence[int]],
    *,
    prefix_token: int,
    max_length: int,
    texts: Sequence[str] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> PerplexityResult:
    """Score each document on its own in lm-evaluation-harness's rolling windows
    (``scoring.rolling_windows``: ``prefix_token`` before the first token, windows reading at
    most ``max_length`` tokens, every token scored once), ``batch_size`` windows per forward.

    ``texts`` (the strings the documents came from) give the harness's units: words are
    ``len(re.split(r"\\s+", text))`` and bytes ``len(text.encode())`` per document, summed, so
    ``word_ppl = exp(nll / words)``, ``byte_ppl = exp(nll / bytes)`` and
    ``bits_per_byte = nll / (bytes * ln 2)`` are the harness's wikitext figures. A document
    with no tokens adds its words and bytes and a log-likelihood of 0, as in the harness.
    In the result, ``context`` and ``stride`` are both ``max_length``.
    """
    if texts is not None and len(texts) != len(documents):
        raise QuicksilverError(f"{len(texts)} texts for {len(documents)} documents")
    if max_length < 1 or max_length > engine.config.max_position_embeddings:
        raise QuicksilverError(
            f"the window length must be between 1 and the model's "
            f"{engine.config.max_position_embeddings} positions, got {max_length}"
        )
    if batch_size < 1:
        raise QuicksilverError(f"batch_size must be at least 1, got {batch_size}")
    windows: list[list[int]] = []
    firsts: list[int] = []
    for ids in documents:
        if len(ids):
            more, first = rolling_requests(list(ids), prefix_token, max_length)
            windows += more
            firsts += first
    if not windows:
        raise QuicksilverError("the documents hold no tokens: there is nothing to score")

    counter = engine.counter
    before = counter.summary()
    logprob = 0.0
    batches = range(0, len(windows), batch_size)
    bar = tqdm(total=len(windows), disable=not progress, file=sys.stderr, unit="window")
    with Meter() as meter, bar:
        for start in batches:
            batch = windows[start : start + batch_size]
            scored = score_tokens(engine, batch, firsts[start : start + batch_size])
            logprob += math.fsum(s.total for s in scored)
            bar.update(len(batch))
    flops = counter.since(before)
    dense = flops["dense"]

    nll_sum = -logprob
    tokens = sum(len(w) - f for w, f in zip(windows, firsts, strict=True))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts) if texts is not None else 0
    n_words = sum(len(re.split(r"\s+", t)) for t in texts) if texts is not None else 0
    return _result(
        nll_sum,
        tokens,
        n_bytes,
        n_words,
        max_length,
        max_length,
        len(windows),
        flops,
        dense,
        meter,
    )


def transformers_perplexity(
    hf_model: Any,
    token_ids: Sequence[int] | torch.Tensor,
    *,
    context: int,
    stride: int,
    max_windows: int | None = None,
) -> tuple[float, int]:
    """(ppl, scored tokens) from a transformers causal LM on the same window plan: the guide's
    recipe, labels outside the scored tail set to -100 and the model's own loss averaged over
    the rest. The reference for our engine's numbers."""
    tokens = _as_token_tensor(token_ids)
    plan = window_plan(len(tokens), context, stride)
    if max_windows is not None:
        plan = plan[:max_windows]
    nll_sum, scored = 0.0, 0
    with torch.inference_mode():
        for begin, end, n_scored in plan:
            input_ids = tokens[begin:end].unsqueeze(0)
            labels = input_ids.clone()
            labels[:, : end - begin - n_scored] = -100
            loss = hf_model(input_ids=input_ids, labels=labels).loss
            nll_sum += float(loss) * n_scored
            scored += n_scored
    return math.exp(nll_sum / scored), scored


# ---------------------------------------------------------------------------------------------


def _as_token_tensor(token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A 1-D int64 tensor; a [1, n] batch of one is accepted too."""
    tokens = torch.as_tensor(token_ids, dtype=torch.long)
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise QuicksilverError(
            f"token_ids must be one sequence of ids, got shape {tuple(tokens.shape)}"
        )
    return tokens


def check_windows(
    max_positions: int,
    n_tokens: int,
    context: int,
    stride: int,
    batch_size: int,
    max_windows: int | None,
) -> None:
    """Reject settings that would crash mid-run or silently score nothing (for a model with
    ``max_positions`` positions and a stream of ``n_tokens``)."""
    if context < 2:
        raise QuicksilverError(f"context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise QuicksilverError(
            f"stride must be between 1 and the context ({context}), got {stride}"
        )
    if context > max_positions:
        raise QuicksilverError(
            f"context {context} exceeds the model's {max_positions} positions; "
            f"use a context of at most {max_positions}"
        )
    if n_tokens < 2:
        raise QuicksilverError(
            f"the text has {n_tokens} token(s); perplexity needs at least 2, use a longer text"
        )
    if batch_size < 1:
        raise QuicksilverError(f"batch_size must be at least 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise QuicksilverError(f"max_windows must be at least 1, got {max_windows}")


def _batches(plan: list[tuple[int, int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Runs of consecutive windows with the same length and scored count, at most batch_size
    each: rows of one forward must share their shape and the head's column indices."""
    groups: list[list[tuple[int, int, int]]] = []
    for window in plan:
        last = groups[-1] if groups else None
        same_shape = (
            last is not None
            and len(last) < batch_size
            and last[0][1] - last[0][0] == window[1] - window[0]
            and last[0][2] == window[2]
        )
        if same_shape:
            last.append(window)
        else:
            groups.append([window])
    return groups


def _score_windows(engine: Any, tokens: torch.Tensor, group: list[tuple[int, int, int]]) -> float:
    """Summed negative log-likelihood of the scored tokens of equally shaped windows: the
    last ``n_scored`` tokens of each, through the one teacher-forced forward."""
    length = group[0][1] - group[0][0]
    n_scored = group[0][2]
    windows = [tokens[begin:end].tolist() for begin, end, _ in group]
    logits = forced_logits(engine, windows, length - n_scored - 1)  # [B, n_scored, V]
    check_finite_logits(logits)
    targets = torch.tensor([w[length - n_scored :] for w in windows])
    return _nll(logits.flatten(0, 1), targets.flatten())


def check_finite_logits(logits: torch.Tensor) -> None:
    """A model whose forward overflowed (or whose weights hold NaN) must fail, not report a
    perplexity of NaN or a log-likelihood that compares as nothing."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogits(
            "the model produced NaN or infinite logits: its weights or this dtype overflow "
            "(try dtype float32, or check the checkpoint)"
        )


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """-sum log softmax(logits)[target], in float32, a chunk of rows at a time."""
    total = 0.0
    for start in range(0, logits.shape[0], LOSS_CHUNK):
        rows = logits[start : start + LOSS_CHUNK].float()
        picked = rows.gather(1, targets[start : start + LOSS_CHUNK, None]).squeeze(1)
        total += float((torch.logsumexp(rows, dim=1) - picked).double().sum())
    return total


def _result(
    nll_sum: float,
    tokens: int,
    n_bytes: int,
    n_words: int,
    context: int,
    stride: int,
    windows: int,
    flops: dict[str, int],
    dense: float,
    meter: Meter,
) -> PerplexityResult:
    """The record both windowings report: perplexity per token, byte and word (lm-eval's
    definitions; NaN where the counts are unknown) and what the run cost."""
    nan = float("nan")
    return PerplexityResult(
        ppl=math.exp(nll_sum / tokens),
        nll_sum=nll_sum,
        tokens=tokens,
        bits_per_byte=nll_sum / (n_bytes * math.log(2)) if n_bytes else nan,
        byte_ppl=math.exp(nll_sum / n_bytes) if n_bytes else nan,
        word_ppl=math.exp(nll_sum / n_words) if n_words else nan,
        n_bytes=n_bytes,
        n_words=n_words,
        context=context,
        stride=stride,
        windows=windows,
        flops=flops,
        flops_per_token=flops["total"] / tokens,
        dense_flops_per_token=dense / tokens,
        seconds=meter.seconds,
        peak_rss_bytes=meter.peak_rss_bytes,
        peak_extra_bytes=meter.peak_extra_bytes,
    )
