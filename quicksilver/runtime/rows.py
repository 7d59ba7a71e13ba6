"""The records of a step batch's rows: what a row asks for, what a step gave it, its state,
and the batch's time and work so far. Plain data, so drafting and the API can read them
without the step loop."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quicksilver.runtime.sampling import SamplingConfig, draw_key
from quicksilver.runtime.speculative.settings import SpeculativeConfig


@dataclass(frozen=True)
class RowSpec:
    """What one row asks for. ``logprobs``: None for none, k >= 0 for the chosen token's
    log-prob and the k most likely alternatives at each generated position."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    speculative: SpeculativeConfig | None = None
    # This row's index among the rows of its request: with the seed, it keys the row's
    # random stream (``sampling.draw_key``), so copies of one prompt draw different text.
    draw_index: int = 0


@dataclass
class RowEvent:
    """What one step produced for one row."""

    row: int
    tokens: list[int]
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None  # "stop", "length"; None while the row runs


@dataclass
class StepStats:
    """Time and work of a StepBatch so far (compilation kept apart from decoding)."""

    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0
    decode_steps: int = 0  # forwards over the running rows
    decode_tokens: int = 0  # tokens those forwards produced
    fed_tokens: int = 0  # token positions that went through the model, padding included
    flops: dict[str, int] = field(default_factory=dict)  # counted in every forward
    decode_flops: dict[str, int] = field(default_factory=dict)  # counted in decode forwards
    drafts: int = 0  # rows that fed drafted tokens in a step
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_at: list[int] = field(default_factory=list)  # accepted count per draft position
    by_method: dict[str, list[int]] = field(default_factory=dict)  # drafts, drafted, accepted
    draft_flops: int = 0  # counted in model draft forwards (inside ``flops``)
    verify_flops: int = 0  # counted in decode forwards that checked drafts
    draft_seconds: float = 0.0  # model draft forwards (inside ``decode_seconds``)
    # measuring the drafting plan: the pieces this batch ran (outside ``decode_seconds``)
    calibration_seconds: float = 0.0
    plan_notes: list[str] = field(default_factory=list)  # a measurement begun or finished


class Row:
    """A row's state in the table (read-only for callers)."""

    def __init__(self, row_id: int, spec: RowSpec) -> None:
        self.id = row_id
        self.spec = spec
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        # Every token is drawn with the uniform of its position in this stream, so what a
        # seeded row samples does not depend on drafts or on the rows beside it.
        self.draw_key = draw_key(spec.sampling.seed, spec.draw_index)
        self.flops = 0.0  # this row's share of the counted FLOPs of the forwards it was in
        self.dense_flops = 0.0  # and of what the dense model would have spent on them
        self.padded: torch.Tensor | None = None  # the left-padded prompt while prefilling

    @property
    def remaining(self) -> int:
        return self.spec.max_new_tokens - len(self.tokens)
