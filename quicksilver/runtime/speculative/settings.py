"""How a row drafts for verified decoding: the settings, checked once, and the methods.

A drafter proposes the next few tokens of a row; the step core feeds them after the row's
last token in one forward and keeps the ones the model agrees with (``acceptance``),
so what a drafter gets right is free speed and what it gets wrong costs one rolled-back slot.

Methods:

- ``ngram`` (prompt lookup, ``speculative.ngram``): the longest suffix of the row's text
  (prompt + generated) that occurred before, n from ``max_ngram`` down to ``min_ngram``; the
  tokens that followed its latest earlier occurrence are the draft. It costs no model work.
- ``layers``: the same model with some layers skipped drafts greedily, one token per draft
  forward (``speculative.self_draft``); which layers are skipped is calibrated on the model's
  own text for the most tokens per unit of measured cost (``speculative.cost_plan``).
- ``planes``: under Matryoshka weights at width 8, the 4-bit plane of the same stored codes
  drafts (one int4 product per linear instead of two) and width 8 verifies.
- ``auto``: per row and step, the method and draft length with the highest expected tokens
  per unit of cost, from the row's measured acceptance and the machine's measured verify and
  draft costs; no draft at all where none pays.

Every drafter is greedy (its draft is certain, q = 1 on the drafted token), so one acceptance
rule (``accept_drafts``) keeps both greedy and sampled output exactly the plain decoder's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from quicksilver.errors import QuicksilverError
from quicksilver.runtime.speculative.self_draft import plane_policy_error

METHODS = ("ngram", "layers", "planes", "auto")
MODEL_METHODS = ("layers", "planes")  # drafters that run the model
# Draft length when none is given: n-gram drafts cost nothing to make; a model's drafts cost a
# forward each, so its length comes from the calibrated plan; auto looks up to this far.
DEFAULT_NGRAM_TOKENS = 6
MAX_DRAFT_TOKENS = 8


@dataclass(frozen=True)
class SpeculativeConfig:
    """How a row drafts: ``method``, up to ``num_tokens`` tokens per step (None: the
    method's default, see ``DEFAULT_NGRAM_TOKENS`` and the calibrated plan)."""

    method: str = "ngram"
    num_tokens: int | None = None
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuicksilverError(
                f"unknown speculative method {self.method!r}; choose one of {', '.join(METHODS)}"
            )
        for name in ("num_tokens", "max_ngram", "min_ngram"):
            value = getattr(self, name)
            if name == "num_tokens" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
                raise QuicksilverError(f"speculative {name} must be an integer in 1..64")
        if self.min_ngram > self.max_ngram:
            raise QuicksilverError("speculative min_ngram must not exceed max_ngram")

    @property
    def max_tokens(self) -> int:
        """The most tokens a row drafts in one step (the cache keeps room for them)."""
        if self.num_tokens is not None:
            return self.num_tokens
        return DEFAULT_NGRAM_TOKENS if self.method == "ngram" else MAX_DRAFT_TOKENS

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


FUSION_NOT_VERIFIABLE = (
    "verified decoding is exact only when tokens do not interact inside a forward; fusion "
    "merges them, so turn fusion off or speculative off"
)


def splits_change_output(policy) -> bool:
    """Whether feeding tokens in one forward or in several gives different results under
    ``policy``: fusion merges a token into the next one of the same forward, so a prompt
    fed in chunks, or drafts verified together, would not be what plain decoding computes."""
    return policy is not None and any(m.name == "fusion" for m in policy.active)


def speculative_policy_error(policy, speculative: SpeculativeConfig | None) -> str | None:
    """Why ``speculative`` cannot run under ``policy`` (None: it can, or nothing drafts).

    Both refusals follow from the settings alone, so callers check them with the request,
    before any work: found at the first decode step instead, they would come after the
    first token was already streamed (and, in the server, after a 200 was sent)."""
    if speculative is None:
        return None
    if splits_change_output(policy):
        return FUSION_NOT_VERIFIABLE
    if speculative.method == "planes":
        return plane_policy_error(policy)
    return None
