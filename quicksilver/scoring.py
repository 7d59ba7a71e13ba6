"""Token-level scores of given token sequences: what ``echo`` + ``logprobs`` and
lm-evaluation-harness's rolling log-likelihood need and ``LLM.loglikelihood`` does not return.

``LLM.loglikelihood`` answers one question per pair (a summed log-probability); a server that
echoes a prompt with its log-probs, or a harness that scores a document in windows, needs the
log-prob of every token and the model's top alternatives at each position. Everything here
goes through ``Engine.forward`` with a fresh cache per forward, so it runs under whatever
policy the engine has, and the FLOP counter sees it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from quicksilver.errors import QuicksilverError
from quicksilver.runtime.cache import pad_token_id
from quicksilver.runtime.engine import Engine
from quicksilver.runtime.sampling import check_logits

# Logits of one forward are [rows, columns, vocab] floats; keep a forward's share below this.
MAX_LOGIT_ELEMENTS = 2**26


@dataclass
class TokenScores:
    """Scores of the tokens ``ids[first:]`` of one sequence, each given the ones before it."""

    first: int  # index in the sequence of the first scored token (at least 1)
    logprobs: list[float]  # natural-log probability of each scored token
    greedy: list[bool]  # each scored token is the model's top choice there
    top: list[list[tuple[int, float]]]  # the top alternatives (id, logprob), best first

    @property
    def total(self) -> float:
        return math.fsum(self.logprobs)

    @property
    def is_greedy(self) -> bool:
        return all(self.greedy)


def score_tokens(
    engine: Engine,
    sequences: Sequence[Sequence[int]],
    firsts: Sequence[int] | None = None,
    top: int = 0,
) -> list[TokenScores]:
    """Log-probs of ``sequence[first:]`` for each sequence (``firsts`` default: 1, every token
    after the first), with the ``top`` best alternatives at each scored position.

    Rows are right-padded into as few forwards as the logit budget allows: attention is
    causal, so a real token never sees the padding after it, and the LM head runs only on the
    columns that predict a scored token.
    """
    firsts = [1] * len(sequences) if firsts is None else list(firsts)
    for ids, first in zip(sequences, firsts, strict=True):
        if not 1 <= first < len(ids):
            raise QuicksilverError(
                f"cannot score from token {first} of a {len(ids)}-token sequence: a scored "
                "token needs at least one token before it"
            )
    results: list[TokenScores | None] = [None] * len(sequences)
    for chunk in forward_chunks([len(s) for s in sequences], engine.config.vocab_size):
        scored = _forward([sequences[i] for i in chunk], [firsts[i] for i in chunk], engine, top)
        for i, result in zip(chunk, scored, strict=True):
            results[i] = result
    return [r for r in results if r is not None]


def forward_chunks(lengths: Sequence[int], vocab: int) -> list[list[int]]:
    """How ``score_tokens`` groups sequences (by index) into forwards: longest first, as many
    rows per forward as keep its logits under ``MAX_LOGIT_ELEMENTS``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks, start = [], 0
    while start < len(order):
        width = lengths[order[start]] - 1
        rows = max(1, MAX_LOGIT_ELEMENTS // max(1, width * vocab))
        chunks.append(order[start : start + rows])
        start += rows
    return chunks


@torch.inference_mode()
def forced_logits(
    engine: Engine,
    sequences: Sequence[Sequence[int]],
    first_column: int,
    prompt_ends: Sequence[int] | None = None,
) -> torch.Tensor:
    """The one teacher-forced forward: every sequence but its last token, right-padded into
    one block (attention is causal, so a real token never sees the padding after it), with
    logits only at columns ``first_column``.. (column c predicts token c + 1): [B, C, V].
    ``prompt_ends`` sets where each prompt ends (SkipDecode counts generated positions from
    there); by default every token is prompt."""
    inputs = [list(ids[:-1]) for ids in sequences]
    width = max(map(len, inputs))
    block = torch.full((len(inputs), width), pad_token_id(engine.config), dtype=torch.long)
    for r, ids in enumerate(inputs):
        block[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    cache = engine.new_cache(len(inputs), width)
    if prompt_ends is not None:
        cache.set_prompt_end(list(prompt_ends))
    return engine.forward(block, cache, logits_at=torch.arange(first_column, width))


def _forward(
    sequences: list[Sequence[int]], firsts: list[int], engine: Engine, top: int
) -> list[TokenScores]:
    low = min(first - 1 for first in firsts)
    logits = forced_logits(engine, sequences, low)
    results = []
    for r, (ids, first) in enumerate(zip(sequences, firsts, strict=True)):
        row = logits[r, first - 1 - low : len(ids) - 1 - low].float()
        check_logits(row)
        logprobs = torch.log_softmax(row, dim=-1)
        targets = torch.tensor(ids[first:], dtype=torch.long)
        chosen = logprobs.gather(1, targets[:, None])[:, 0]
        best = logprobs.argmax(dim=-1)
        alternatives: list[list[tuple[int, float]]] = [[] for _ in range(len(targets))]
        if top:
            values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
            alternatives = [
                list(zip(i, v, strict=True))
                for i, v in zip(indices.tolist(), values.tolist(), strict=True)
            ]
        results.append(
            TokenScores(
                first=first,
                logprobs=chosen.double().tolist(),
                # A tie with the best counts as greedy: the token's log-prob is the maximum.
                greedy=(chosen >= logprobs.gather(1, best[:, None])[:, 0]).tolist(),
                top=alternatives,
            )
        )
    return results


# ---------------------------------------------------------------- rolling windows


def rolling_windows(n_tokens: int, max_length: int) -> list[tuple[int, int, int]]:
    """lm-evaluation-harness's document-level windows (``get_rolling_token_windows`` with
    ``context_len=1`` and ``make_disjoint_window``), as (begin, end, n_scored) over the
    stream ``[prefix] + tokens``: the model reads ``stream[begin:end - 1]`` and the last
    ``n_scored`` tokens of ``stream[begin:end]`` are scored.

    Every token of the document is scored once: the first window from the prefix token, each
    later one given the ``max_length - n_scored`` tokens before it, so a full window has one
    token of context and the last, partial one as much as fits.
    """
    if n_tokens < 1 or max_length < 1:
        raise QuicksilverError(
            f"rolling windows need tokens and max_length >= 1, got {n_tokens}, {max_length}"
        )
    first = min(max_length, n_tokens)
    plan = [(0, first + 1, first)]
    predicted = first
    while predicted < n_tokens:
        n_scored = min(n_tokens - predicted, max_length)
        end = predicted + n_scored
        plan.append((end - max_length, end + 1, n_scored))
        predicted = end
    return plan


def rolling_loglikelihood(
    engine: Engine,
    token_ids: Sequence[int],
    *,
    prefix_token: int,
    max_length: int,
    batch_size: int = 8,
) -> float:
    """log P(document), summed over its tokens, in lm-evaluation-harness's rolling windows
    (``rolling_windows``); ``prefix_token`` (EOS or BOS) stands before the first token."""
    windows, firsts = rolling_requests(token_ids, prefix_token, max_length)
    total = 0.0
    for start in range(0, len(windows), batch_size):
        scored = score_tokens(
            engine, windows[start : start + batch_size], firsts[start : start + batch_size]
        )
        total += math.fsum(s.total for s in scored)
    return total


def rolling_requests(
    token_ids: Sequence[int], prefix_token: int, max_length: int
) -> tuple[list[list[int]], list[int]]:
    """The windows of ``rolling_windows`` as ``score_tokens`` takes them: each window's
    tokens (the prefix token before the document's first) and the index of its first scored
    token."""
    stream = [prefix_token, *token_ids]
    plan = rolling_windows(len(token_ids), max_length)
    windows = [stream[begin:end] for begin, end, _ in plan]
    firsts = [len(w) - n for w, (_, _, n) in zip(windows, plan, strict=True)]
    return windows, firsts


def prefix_token_id(
    tokenizer: Any, eos_token_ids: Sequence[int] = (), bos_token_id: int | None = None
) -> int:
    """What stands before a document or for an empty context in lm-evaluation-harness's
    scoring: BOS (the tokenizer's, else the model's), else EOS — the one rule."""
    candidates = (
        getattr(tokenizer, "bos_token_id", None),
        bos_token_id,
        getattr(tokenizer, "eos_token_id", None),
        *eos_token_ids,
    )
    for token in candidates:
        if token is not None:
            return int(token)
    raise QuicksilverError("the model has no BOS or EOS token to start a document with")
