"""Drafting tokens for verified decoding: guesses the full model then checks.

A drafter proposes the next few tokens of a row; the step core feeds them after the row's
last token in one forward and keeps the ones the model agrees with (``batch.accept_drafts``),
so what a drafter gets right is free speed and what it gets wrong costs one rolled-back slot.

``ngram`` (prompt lookup): the longest suffix of the row's text (prompt + generated) that
occurred before, n from ``max_ngram`` down to ``min_ngram``; the tokens that followed its
latest earlier occurrence are the draft. It costs no model work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from quicksilver.errors import QuicksilverError
from quicksilver.runtime.sampling import SamplingConfig, probabilities

METHODS = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """How a row drafts: ``method``, up to ``num_tokens`` tokens per step."""

    method: str = "ngram"
    num_tokens: int = 6
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuicksilverError(
                f"unknown speculative method {self.method!r}; choose one of {', '.join(METHODS)}"
            )
        for name in ("num_tokens", "max_ngram", "min_ngram"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
                raise QuicksilverError(f"speculative {name} must be an integer in 1..64")
        if self.min_ngram > self.max_ngram:
            raise QuicksilverError("speculative min_ngram must not exceed max_ngram")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "num_tokens": self.num_tokens,
            "max_ngram": self.max_ngram,
            "min_ngram": self.min_ngram,
        }


def speculative_config(value: Any) -> SpeculativeConfig | None:
    """``None`` / ``False`` (off), a method name or a mapping of SpeculativeConfig's fields."""
    if value is None or value is False:
        return None
    if isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        return SpeculativeConfig(method=value)
    if isinstance(value, Mapping):
        unknown = sorted(set(map(str, value)) - set(SpeculativeConfig.__dataclass_fields__))
        if unknown:
            raise QuicksilverError(
                f"unknown speculative setting {unknown[0]!r}; accepted: method, num_tokens, "
                "max_ngram, min_ngram"
            )
        return SpeculativeConfig(**dict(value))
    raise QuicksilverError(
        f"speculative must be a method name ({', '.join(METHODS)}) or a mapping, "
        f"got {type(value).__name__}"
    )


def draft_tokens(
    config: SpeculativeConfig, prompt: Sequence[int], generated: Sequence[int], limit: int
) -> list[int]:
    """Up to ``limit`` drafted tokens to follow ``prompt + generated``."""
    if limit <= 0:
        return []
    return ngram_draft(list(prompt) + list(generated), limit, config.max_ngram, config.min_ngram)


def ngram_draft(history: list[int], limit: int, max_ngram: int, min_ngram: int = 1) -> list[int]:
    """The tokens after the latest earlier occurrence of the longest matching suffix."""
    size = len(history)
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        suffix = history[size - n :]
        # Latest occurrence that ends before the suffix itself and has a token after it.
        for begin in range(size - n - 1, -1, -1):
            if history[begin : begin + n] == suffix:
                follow = history[begin + n : begin + n + limit]
                if follow:
                    return follow
    return []


def accept_drafts(
    logits: torch.Tensor,
    draft: list[int],
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Verify one row's drafted tokens against the model's logits at the fed positions
    ([len(draft) + 1 or more, V]: position j predicts the token after the j-th fed one).

    Returns (drafted tokens accepted, the token the model adds after them). Greedy accepts
    while the draft equals the argmax. Sampling uses the lossless rule for a drafter that
    proposes one token with certainty: accept it with probability p(token) (= min(1, p/q) for
    q = 1), else draw from p with that token removed and renormalised (= max(0, p - q)); the
    emitted tokens are then distributed exactly as plain sampling's.
    """
    if sampling.greedy:
        best = logits[: len(draft) + 1].argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(draft) and draft[accepted] == best[accepted]:
            accepted += 1
        return accepted, best[accepted]
    probs = probabilities(logits[: len(draft) + 1], sampling)
    for position, token in enumerate(draft):
        p = probs[position]
        if float(torch.rand((), generator=generator, dtype=torch.float64)) < float(p[token]):
            continue
        residual = p.clone()
        residual[token] = 0.0
        total = float(residual.sum())
        if total <= 0.0:  # p was all on the drafted token: it cannot be rejected
            continue
        return position, int(torch.multinomial(residual / total, 1, generator=generator))
    bonus = torch.multinomial(probs[len(draft)], 1, generator=generator)
    return len(draft), int(bonus)
