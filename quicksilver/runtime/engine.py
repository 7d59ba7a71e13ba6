"""Prefill, decode and generation: the loop over layers lives here (under a policy, in
``runtime.adaptive``).

``Engine.forward`` runs a [B, S] block of new tokens through the model, writing their K/V into
the cache and feeding the FLOP counter with what executed. Prefill and decode are the same
call with S = prompt length or S = 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from quicksilver.accounting import FlopCounter, layer_weight_count
from quicksilver.errors import QuicksilverError
from quicksilver.models.transformer import Step, Transformer
from quicksilver.policies.stack import Policy
from quicksilver.runtime.adaptive import adaptive_forward
from quicksilver.runtime.cache import KVCache
from quicksilver.runtime.sampling import SamplingConfig, make_generator, sample_next

TokenCallback = Callable[[int, int], None]  # (row, token id)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per row, without the prompt
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    finish_reasons: list[str] = field(default_factory=list)  # per row: "stop" or "length"
    flops: dict[str, int] = field(default_factory=dict)  # prefill and decode
    decode_flops: dict[str, int] = field(default_factory=dict)  # decode steps only

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        rows = len(self.tokens)
        return rows * self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0


class Engine:
    """Runs a model, optionally under an adaptive policy; counts what executed."""

    def __init__(
        self,
        model: Transformer,
        counter: FlopCounter | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.model = model
        self.config = model.config
        self.counter = counter if counter is not None else FlopCounter(model.config)
        self.policy: Policy | None = None
        self.set_policy(policy)

    def set_policy(self, policy: Policy | None) -> None:
        """Use ``policy`` from the next forward on (None or an off policy: the dense model).
        Checks it against the model and does its one-time preparation (e.g. quantisation)."""
        if policy is not None:
            policy.check_model(self.config)
        if self.policy is not None and self.policy is not policy:
            self.policy.release(self.model, keep=policy)
        if policy is not None:
            policy.prepare(self.model)
        self.policy = policy

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        if max_len > self.config.max_position_embeddings:
            raise QuicksilverError(
                f"prompt plus new tokens need {max_len} positions, more than the model's "
                f"{self.config.max_position_embeddings}; shorten the prompt or --max-new-tokens"
            )
        return KVCache(self.config, batch_size, max_len, self.model.dtype)

    def make_step(self, cache: KVCache, n_new: int) -> Step:
        first = cache.reserve(n_new)
        batch = cache.batch_size
        slots = torch.arange(first, first + n_new).expand(batch, n_new)
        positions = (slots - cache.start.view(-1, 1)).clamp(min=0)
        # No mask needed for a plain causal block from slot 0, or for one new token per row
        # that may read every slot before it.
        window_ok = not cache.sliding_window or first + n_new <= cache.sliding_window
        needs_mask = cache.padded or not window_ok or (first > 0 and n_new > 1)
        mask = cache.attention_mask(slots, first + n_new) if needs_mask else None
        return Step(
            positions=positions,
            slots=slots,
            write_start=first,
            attend_len=first + n_new,
            mask=mask,
            rope=self.model.rope_for(positions),
        )

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        logits_at: torch.Tensor | str = "last",
        step: Step | None = None,
    ) -> torch.Tensor:
        """Run new tokens [B, S]; return logits at ``"last"`` ([B, V]), ``"all"``
        ([B, S, V]) or at the given column indices ([B, len(idx), V]).

        ``step`` overrides where the tokens go (default: the next S slots of every row)."""
        batch, n_new = tokens.shape
        step = step or self.make_step(cache, n_new)
        maskless_ok = step.write_start is not None and (
            step.attend_len == step.write_start + n_new and (n_new == 1 or step.write_start == 0)
        )
        if step.mask is None and not maskless_ok:
            raise ValueError("a step with explicit slots or after earlier slots needs a mask")
        if self.policy is not None and not self.policy.is_off:
            h = adaptive_forward(self, tokens, cache, step, self.policy)
        else:
            h = self.model.embed_tokens(tokens, step.positions)
            self.counter.add_embedding(batch * n_new)
            layer_bytes = layer_weight_count(self.config) * h.element_size()
            pairs = step.attended_pairs(batch, n_new)
            for i, block in enumerate(self.model.blocks):
                h = block(h, step, cache.k[i], cache.v[i])
                self.counter.add_layer(i, batch * n_new, pairs)
                self.counter.add_weight_read(0, layer_bytes)
        if isinstance(logits_at, str):
            h = h[:, -1] if logits_at == "last" else h
        else:
            h = h[:, logits_at]
        self.counter.add_head(h.shape[0] * (h.shape[1] if h.dim() == 3 else 1))
        return self.model.logits(h)

    def prefill(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> tuple[torch.Tensor, KVCache]:
        """Left-pad the prompts into one block, fill a fresh cache, return last logits."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise QuicksilverError("every prompt must contain at least one token")
        longest = max(len(p) for p in prompts)
        # The last sampled token is never fed back: one slot fewer than prompt + new tokens.
        cache = self.new_cache(len(prompts), longest + max_new_tokens - 1)
        pad = self.config.eos_token_ids[0] if self.config.eos_token_ids else 0
        block = torch.full((len(prompts), longest), pad, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            block[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            cache.start[row] = longest - len(prompt)
        cache.padded = any(len(p) != longest for p in prompts)
        cache.prompt_end = longest
        return self.forward(block, cache), cache

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingConfig | None = None,
        stop_ids: Sequence[int] | None = None,
        on_token: TokenCallback | None = None,
    ) -> GenerationResult:
        """Batched generation; each row stops at a stop id or after ``max_new_tokens``.

        Finished rows keep riding along in the batch (uniform shapes), their tokens ignored;
        their work is counted because it ran.
        """
        generation = self.start(prompts, max_new_tokens, sampling, stop_ids)
        for new in generation:
            if on_token is not None:
                for row, token in new:
                    on_token(row, token)
        return generation.result()

    def start(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingConfig | None = None,
        stop_ids: Sequence[int] | None = None,
    ) -> Generation:
        """A batched generation to drive one step at a time (streaming, stop strings)."""
        return Generation(self, prompts, max_new_tokens, sampling, stop_ids)


class Generation:
    """Batched generation, one step at a time: iterating yields, per step, the (row, token)
    pairs produced (the first step's come from the prompts' forward). ``finish(row)`` ends a
    row early (e.g. its text reached a stop string); ``result()`` sums up once iteration ends.
    """

    def __init__(
        self,
        engine: Engine,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingConfig | None,
        stop_ids: Sequence[int] | None,
    ) -> None:
        if max_new_tokens < 1:
            raise QuicksilverError("max_new_tokens must be at least 1")
        self.engine = engine
        self.prompts = [list(p) for p in prompts]
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling or SamplingConfig()
        self.stops = set(engine.config.eos_token_ids if stop_ids is None else stop_ids)
        self.tokens: list[list[int]] = [[] for _ in self.prompts]
        self.finish_reasons: list[str | None] = [None] * len(self.prompts)
        self.prefill_seconds = self.decode_seconds = 0.0
        self.decode_steps = 0
        self._flops_before: dict[str, int] = {}
        self._flops_after_prefill: dict[str, int] = {}
        self._ended = False

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.finish_reasons)

    def finish(self, row: int, reason: str = "stop") -> None:
        """End ``row`` now (its later tokens are not produced)."""
        if self.finish_reasons[row] is None:
            self.finish_reasons[row] = reason

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        engine = self.engine
        generator = make_generator(self.sampling)
        counter = engine.counter
        self._flops_before = counter.summary()
        start = time.perf_counter()
        logits, cache = engine.prefill(self.prompts, self.max_new_tokens)
        self.prefill_seconds = time.perf_counter() - start
        self._flops_after_prefill = counter.summary()
        start = time.perf_counter()
        try:
            while True:
                next_ids = sample_next(logits, self.sampling, generator)
                new = []
                for row, token in enumerate(next_ids.tolist()):
                    if self.finish_reasons[row] is not None:
                        continue
                    self.tokens[row].append(token)
                    new.append((row, token))
                    if token in self.stops:
                        self.finish_reasons[row] = "stop"
                    elif len(self.tokens[row]) >= self.max_new_tokens:
                        self.finish_reasons[row] = "length"
                paused = time.perf_counter()
                yield new
                start += time.perf_counter() - paused  # the consumer's time is not decoding
                if self.done:
                    break
                logits = engine.forward(next_ids.view(-1, 1), cache)
                self.decode_steps += 1
        finally:
            self.decode_seconds = time.perf_counter() - start
            self._ended = True

    def result(self) -> GenerationResult:
        if not self._ended:
            raise QuicksilverError("the generation has not run yet: iterate over it first")
        counter = self.engine.counter
        return GenerationResult(
            tokens=self.tokens,
            prompt_tokens=sum(len(p) for p in self.prompts),
            prefill_seconds=self.prefill_seconds,
            decode_seconds=self.decode_seconds,
            decode_steps=self.decode_steps,
            finish_reasons=[reason or "stop" for reason in self.finish_reasons],
            flops=counter.since(self._flops_before),
            decode_flops=counter.since(self._flops_after_prefill),
        )
