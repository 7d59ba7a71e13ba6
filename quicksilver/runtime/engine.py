"""Prefill, decode and generation: the loop over layers lives here (under a policy, in
``runtime.adaptive``).

``Engine.forward`` runs a [B, S] block of new tokens through the model, writing their K/V into
the cache and feeding the FLOP counter with what executed. Prefill and decode are the same
call with S = prompt length or S = 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from quicksilver.accounting import FlopCounter, layer_weight_count
from quicksilver.errors import QuicksilverError
from quicksilver.models.transformer import Step, Transformer
from quicksilver.policies.stack import PolicyStack
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
        policy: PolicyStack | None = None,
    ) -> None:
        self.model = model
        self.config = model.config
        self.counter = counter if counter is not None else FlopCounter(model.config)
        self.policy: PolicyStack | None = None
        self.set_policy(policy)

    def set_policy(self, policy: PolicyStack | None) -> None:
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
        if max_new_tokens < 1:
            raise QuicksilverError("max_new_tokens must be at least 1")
        sampling = sampling or SamplingConfig()
        generator = make_generator(sampling)
        stops = set(self.config.eos_token_ids if stop_ids is None else stop_ids)
        flops_before = self.counter.summary()
        start = time.perf_counter()
        logits, cache = self.prefill(prompts, max_new_tokens)
        prefill_seconds = time.perf_counter() - start
        flops_after_prefill = self.counter.summary()
        outputs: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        steps = 0
        start = time.perf_counter()
        while True:
            next_ids = sample_next(logits, sampling, generator)
            for row, token in enumerate(next_ids.tolist()):
                if done[row]:
                    continue
                outputs[row].append(token)
                if on_token is not None:
                    on_token(row, token)
                if token in stops or len(outputs[row]) >= max_new_tokens:
                    done[row] = True
            if all(done):
                break
            logits = self.forward(next_ids.view(-1, 1), cache)
            steps += 1
        decode_seconds = time.perf_counter() - start
        return GenerationResult(
            tokens=outputs,
            prompt_tokens=sum(len(p) for p in prompts),
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
            decode_steps=steps,
            flops=self.counter.since(flops_before),
            decode_flops=self.counter.since(flops_after_prefill),
        )
