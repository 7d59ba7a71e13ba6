"""A whole generation in one call: every prompt through one ``StepBatch`` to its end.

``Engine.generate`` (the benchmarks', the evaluations' and the tests' entry) is this; the API's
``LLM.generate`` runs the same step core through ``api.session.Batch`` with text on top.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quicksilver.errors import QuicksilverError
from quicksilver.runtime.batch import RowSpec, StepBatch, room_for
from quicksilver.runtime.drafting import SpeculativeConfig, speculative_policy_error
from quicksilver.runtime.sampling import SamplingConfig

if TYPE_CHECKING:
    from quicksilver.runtime.engine import Engine

TokenCallback = Callable[[int, int], None]  # (prompt index, token id)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt, without the prompt
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    finish_reasons: list[str] = field(default_factory=list)  # per row: "stop" or "length"
    flops: dict[str, int] = field(default_factory=dict)  # prefill and decode
    decode_flops: dict[str, int] = field(default_factory=dict)  # decode forwards only
    compile_seconds: float = 0.0  # compiling decode steps, left out of decode_seconds
    decode_tokens: int = 0  # tokens produced by decode forwards (not the prompts' forward)
    fed_tokens: int = 0  # token positions through the model, left padding included

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


def generate(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    stop_ids: Sequence[int] | None = None,
    on_token: TokenCallback | None = None,
    speculative: SpeculativeConfig | None = None,
    ignore_eos: bool = False,
) -> GenerationResult:
    """Every prompt to its end in one StepBatch (all prompts prefilled together, as one
    left-padded block); each row stops at one of the model's EOS ids, at one of ``stop_ids``
    or after ``max_new_tokens``, and leaves the batch at once.

    ``stop_ids`` add to EOS, as in ``LLM.generate`` (and vLLM): one meaning everywhere.
    ``ignore_eos`` turns the EOS stop off, for runs that need every row to reach
    ``max_new_tokens`` (throughput, position-by-position comparisons).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise QuicksilverError("every prompt must contain at least one token")
    if max_new_tokens < 1:
        raise QuicksilverError("max_new_tokens must be at least 1")
    error = speculative_policy_error(engine.policy, speculative)
    if error is not None:
        raise QuicksilverError(error)
    longest = max(len(p) for p in prompts)
    batch = StepBatch(
        engine,
        max_rows=len(prompts),
        max_len=room_for(engine.config, longest + max_new_tokens - 1, speculative),
        prefill_tokens=len(prompts) * longest,
    )
    eos = () if ignore_eos else engine.config.eos_token_ids
    stops = frozenset([*eos, *(stop_ids or ())])
    sampling = sampling or SamplingConfig()
    ids = [  # one seed for the whole call: row i draws from the seed's i-th stream
        batch.admit(RowSpec(tuple(p), max_new_tokens, sampling, stops, None, speculative, i))
        for i, p in enumerate(prompts)
    ]
    index = {row_id: i for i, row_id in enumerate(ids)}
    rows = [batch.row(row_id) for row_id in ids]
    while batch.has_work:
        for event in batch.step():
            if on_token is not None:
                for token in event.tokens:
                    on_token(index[event.row], token)
    stats = batch.stats
    return GenerationResult(
        tokens=[row.tokens for row in rows],
        prompt_tokens=sum(len(p) for p in prompts),
        prefill_seconds=stats.prefill_seconds,
        decode_seconds=stats.decode_seconds,
        decode_steps=stats.decode_steps,
        finish_reasons=[row.finish_reason or "stop" for row in rows],
        flops=dict(stats.flops),
        decode_flops=dict(stats.decode_flops),
        compile_seconds=stats.compile_seconds,
        decode_tokens=stats.decode_tokens,
        fed_tokens=stats.fed_tokens,
    )
