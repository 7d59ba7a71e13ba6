"""A whole generation in one call: every prompt through one ``StepBatch`` to its end.

``generate(engine, ...)`` is the benchmarks', the evaluations' and the tests' entry; the API's
``LLM.generate`` runs the same step core through ``api.session.Batch`` with text on top.
``prefill_block`` is the prompts' forward alone, for measuring it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from quicksilver.errors import QuicksilverError
from quicksilver.runtime.batch import StepBatch
from quicksilver.runtime.cache import KVCache, left_padded, pad_token_id, room_for
from quicksilver.runtime.rows import RowSpec
from quicksilver.runtime.sampling import SamplingConfig
from quicksilver.runtime.speculative.plans import DraftPlans
from quicksilver.runtime.speculative.settings import SpeculativeConfig, speculative_policy_error

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
    plans: DraftPlans | None = None,
) -> GenerationResult:
    """Every prompt to its end in one StepBatch (all prompts prefilled together, as one
    left-padded block); each row stops at one of the model's EOS ids, at one of ``stop_ids``
    or after ``max_new_tokens``, and leaves the batch at once.

    ``stop_ids`` add to EOS, as in ``LLM.generate`` (and vLLM): one meaning everywhere.
    ``ignore_eos`` turns the EOS stop off, for runs that need every row to reach
    ``max_new_tokens`` (throughput, position-by-position comparisons). ``plans``: the
    drafting plans to follow (None: this call's own, measured here between steps as needed).
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
        max_len=room_for(
            engine.config,
            longest + max_new_tokens - 1,
            speculative.max_tokens if speculative is not None else 0,
        ),
        prefill_tokens=len(prompts) * longest,
        plans=plans,
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


def prefill_block(
    engine: Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> tuple[torch.Tensor, KVCache]:
    """Left-pad the prompts into one block, fill a fresh cache with room for
    ``max_new_tokens`` more, return the last logits ([B, V]) and the cache."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise QuicksilverError("every prompt must contain at least one token")
    longest = max(len(p) for p in prompts)
    # The last sampled token is never fed back: one slot fewer than prompt + new tokens.
    cache = engine.new_cache(len(prompts), longest + max_new_tokens - 1)
    cache.left_pad([len(p) for p in prompts])
    cache.set_prompt_end(longest)
    pad = pad_token_id(engine.config)
    block = torch.stack([left_padded(prompt, longest, pad) for prompt in prompts])
    return engine.forward(block, cache), cache
