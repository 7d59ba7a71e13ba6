"""The runner: prefill, decode and generation, and the one loop over layers.

``Engine.forward`` runs a [B, S] block of new tokens through the model, writing their K/V into
the cache and feeding the FLOP counter with what executed. Prefill and decode are the same
call with S = prompt length or S = 1. Dense is the case where every token runs every layer;
under a policy, ``ActiveTokens`` says which tokens run each layer and the others are gathered
out (never masked), so the counter and the clock see only what ran.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import torch

from quicksilver.accounting import FlopCounter
from quicksilver.errors import QuicksilverError
from quicksilver.models.transformer import Block, Transformer, WidthGroups, run_linear
from quicksilver.policies.stack import Policy
from quicksilver.runtime.active import ActiveTokens
from quicksilver.runtime.attention import attend
from quicksilver.runtime.batch import left_padded, pad_token_id
from quicksilver.runtime.cache import KVCache, check_cache_fits
from quicksilver.runtime.compiled import CompiledDecode
from quicksilver.runtime.context import ForwardContext
from quicksilver.runtime.draft_plan import DraftPlan, calibrate
from quicksilver.runtime.drafting import SpeculativeConfig
from quicksilver.runtime.generate import GenerationResult, TokenCallback, generate
from quicksilver.runtime.sampling import SamplingConfig
from quicksilver.runtime.self_draft import DraftShape

LayerObserver = Callable[[int, torch.Tensor], None]  # (layer, states [B, S, d])
# (engine, calibration prompt, progress) -> the plan: ``calibrate`` or a cache in front of it
PlanSource = Callable[["Engine", Sequence[int], Callable[[str], None] | None], DraftPlan]


class Engine:
    """Runs a model, optionally under an adaptive policy; counts what executed."""

    def __init__(
        self,
        model: Transformer,
        counter: FlopCounter | None = None,
        policy: Policy | None = None,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.config = model.config
        self.counter = counter if counter is not None else FlopCounter(model.config)
        self.policy: Policy | None = None
        self.set_policy(policy)
        # The dense one-token step as one compiled graph (``runtime.compiled``), if asked.
        self.compiled: CompiledDecode | None = CompiledDecode(model) if compile else None
        # Measured drafting plans (``runtime.draft_plan``), one per policy configuration.
        self.draft_plans: dict[str, DraftPlan] = {}
        # Where a missing plan comes from (the API's on-disk cache); None: measured here.
        self.plan_source: PlanSource | None = None

    def plan_key(self) -> str:
        """Which drafting plan applies: costs and agreements depend on the policy."""
        policy = self.policy
        return json.dumps(policy.to_config() if policy is not None else {}, sort_keys=True)

    def draft_plan(
        self, calibration_prompt: Sequence[int], progress: Callable[[str], None] | None = None
    ) -> DraftPlan:
        """The drafting plan for the current policy, measured on ``calibration_prompt`` if
        nobody gave one (``LLM`` brings a cached one, measured on its calibration text);
        ``progress(message)`` hears each stage of a measurement."""
        key = self.plan_key()
        if key not in self.draft_plans:
            source = self.plan_source or calibrate
            self.draft_plans[key] = source(self, calibration_prompt, progress)
        return self.draft_plans[key]

    @property
    def compile_seconds(self) -> float:
        """Time spent compiling decode steps so far (0 when nothing is compiled)."""
        return self.compiled.compile_seconds if self.compiled is not None else 0.0

    def set_policy(self, policy: Policy | None) -> None:
        """Use ``policy`` from the next forward on (None or an off policy: the dense model).
        Checks it against the model, does its one-time preparation (e.g. quantisation) and
        releases what the previous policy prepared and the new one does not share."""
        if policy is not None:
            policy.check_model(self.config)
        if self.policy is not None and self.policy is not policy:
            self.policy.release(self.model, keep=policy)
        if policy is not None:
            policy.prepare(self.model)
        self.policy = policy

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache for ``batch_size`` rows of up to ``max_len`` tokens, checked against the
        model's positions and the memory available before anything is allocated."""
        check_cache_fits(
            self.config,
            self.model.dtype,
            rows=batch_size,
            length=max_len,
            fix="use a shorter prompt, fewer new tokens or fewer rows",
        )
        if self.compiled is not None:
            max_len = self.compiled.capacity(max_len)
        return KVCache(self.config, batch_size, max_len, self.model.dtype)

    def context(self, cache: KVCache, n_new: int) -> ForwardContext:
        """Place the next ``n_new`` tokens of every row in ``cache`` (reserving their slots)."""
        return ForwardContext.next_block(cache, n_new, self.model.rope_for)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        logits_at: torch.Tensor | str = "last",
        context: ForwardContext | None = None,
        observe: LayerObserver | None = None,
        draft: DraftShape | None = None,
    ) -> torch.Tensor:
        """Run new tokens [B, S]; return logits at ``"last"`` ([B, V]), ``"all"``
        ([B, S, V]) or at the given column indices ([B, len(idx), V]).

        ``context`` overrides where the tokens go (default: each row's next S slots).
        ``observe(layer, states)`` sees the [B, S, d] states after each layer (halted and
        merged tokens keep the state they stopped with). ``draft``: a self-draft forward
        (``runtime.self_draft``): only its layers run, at its width, every token alike (no
        policy decisions); it adds nothing to the dense-equivalent count, since plain
        decoding would not run it at all."""
        batch, n_new = tokens.shape
        policy = self.policy
        dense = policy is None or policy.is_off or draft is not None
        if (
            self.compiled is not None
            and draft is None
            and dense
            and n_new == 1
            and context is None
            and observe is None
            and isinstance(logits_at, str)
            and self.compiled.supports(cache)
        ):
            return self._compiled_step(tokens, cache)
        context = context or self.context(cache, n_new)
        if isinstance(logits_at, str):
            head_rows = batch if logits_at == "last" else batch * n_new
        else:
            head_rows = batch * len(logits_at)
        dense_pairs = context.attended_pairs()
        if draft is None:
            self.counter.add_dense_equivalent(batch * n_new, dense_pairs, head_rows)
        active = None
        if not dense:
            active = ActiveTokens(policy, self.model, context, self.counter)
        counter = self.counter
        h = self.model.embed_tokens(tokens, context.positions)
        counter.add_embedding(batch * n_new)
        flat = h.reshape(batch * n_new, -1)
        full_bytes = self.model.layer_weight_bytes()
        draft_widths, read_bits = None, 0
        if draft is not None and draft.bits is not None:
            draft_widths = WidthGroups([(torch.arange(batch * n_new), draft.bits)])
            read_bits, full_bytes = draft.bits, draft.layer_bytes or full_bytes
        for i, block in enumerate(self.model.blocks):
            if draft is not None and not draft.runs(i):
                continue  # a skipped layer of a self-draft: not called, not counted
            index = None if active is None else active.running(i)
            widths = draft_widths if active is None else active.widths(index)
            if index is None:
                before = flat
                flat = self._dense_layer(block, i, flat.view(batch, n_new, -1), context, widths)
                flat = flat.reshape(batch * n_new, -1)
                counter.add_layer(i, batch * n_new, dense_pairs)
                after = flat
            else:
                active.leave_kv(i, block, flat)
                if not len(index):  # every token has stopped: the remaining layers run nothing
                    continue
                before = flat[index]
                after, pairs = self._gathered_layer(
                    block, i, before, index, context, active, widths
                )
                flat[index] = after
                counter.add_layer(i, len(index), pairs)
            if active is None:
                counter.add_weight_read(read_bits, full_bytes)
            else:
                active.count_weights(widths, full_bytes)
                everyone = torch.arange(batch * n_new) if index is None else index
                active.after_layer(i, everyone, before, after, flat)
            if observe is not None:
                observe(i, flat.view(batch, n_new, -1))
        h = flat.view(batch, n_new, -1)
        if isinstance(logits_at, str):
            h = h[:, -1] if logits_at == "last" else h
        else:
            h = h[:, logits_at]
        counter.add_head(h.shape[0] * (h.shape[1] if h.dim() == 3 else 1))
        return self.model.logits(h)

    def _compiled_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row through the compiled graph; counted like the eager step, with
        attention over the slots the graph actually read (its bucket, masked entries too)."""
        slots, _ = cache.reserve(1)
        slots = slots[:, 0]
        logits = self.compiled(tokens, cache, slots)
        batch = tokens.shape[0]
        pairs = batch * self.compiled.read_len(cache, slots)
        counter = self.counter
        counter.add_dense_equivalent(batch, pairs, batch)
        counter.add_embedding(batch)
        layer_bytes = self.model.layer_weight_bytes()
        for layer in range(self.config.n_layers):
            counter.add_layer(layer, batch, pairs)
            counter.add_weight_read(0, layer_bytes)
        counter.add_head(batch)
        return logits

    def _dense_layer(
        self,
        block: Block,
        layer: int,
        h: torch.Tensor,
        context: ForwardContext,
        widths: WidthGroups | None,
    ) -> torch.Tensor:
        """Every token of the [B, S] block through ``block``."""
        cache, attn = context.cache, block.attn

        def attention(normed: torch.Tensor) -> torch.Tensor:
            q, k, v = attn.project(normed, context.rope, widths)
            if context.write_start is not None:
                end = context.write_start + k.shape[1]
                cache.k[layer, :, :, context.write_start : end] = k.transpose(1, 2)
                cache.v[layer, :, :, context.write_start : end] = v.transpose(1, 2)
            else:
                rows, cols = torch.nonzero(context.slots >= 0, as_tuple=True)
                slots = context.slots[rows, cols]
                cache.k[layer, rows, :, slots] = k[rows, cols]
                cache.v[layer, rows, :, slots] = v[rows, cols]
            out, _ = attend(q, context, layer)
            return run_linear(attn.out, out, widths)

        return block(h, attention, widths)

    def _gathered_layer(
        self,
        block: Block,
        layer: int,
        x: torch.Tensor,
        index: torch.Tensor,
        context: ForwardContext,
        active: ActiveTokens,
        widths: WidthGroups | None,
    ) -> tuple[torch.Tensor, int]:
        """The tokens ``index`` of the flattened block (x: [N, d]) through ``block``."""
        cache, attn = context.cache, block.attn
        rows, slots = active.rows_of[index], active.slot_of[index]
        log_size = active.log_sizes(layer)
        pairs = [0]

        def attention(normed: torch.Tensor) -> torch.Tensor:
            q, k, v = attn.project(normed, context.rope_at(index), widths)  # [N, 1, heads, hd]
            cache.k[layer, rows, :, slots] = k[:, 0]
            cache.v[layer, rows, :, slots] = v[:, 0]
            out, pairs[0] = attend(q, context, layer, index, log_size)
            return run_linear(attn.out, out, widths)

        out = block(x.unsqueeze(1), attention, widths)[:, 0]
        return out, pairs[0]

    def prefill(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> tuple[torch.Tensor, KVCache]:
        """Left-pad the prompts into one block, fill a fresh cache, return last logits."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise QuicksilverError("every prompt must contain at least one token")
        longest = max(len(p) for p in prompts)
        # The last sampled token is never fed back: one slot fewer than prompt + new tokens.
        cache = self.new_cache(len(prompts), longest + max_new_tokens - 1)
        cache.left_pad([len(p) for p in prompts])
        cache.set_prompt_end(longest)
        pad = pad_token_id(self.config)
        block = torch.stack([left_padded(prompt, longest, pad) for prompt in prompts])
        return self.forward(block, cache), cache

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingConfig | None = None,
        stop_ids: Sequence[int] | None = None,
        on_token: TokenCallback | None = None,
        speculative: SpeculativeConfig | None = None,
        ignore_eos: bool = False,
    ) -> GenerationResult:
        """Batched generation through the step core (``runtime.generate``): ``stop_ids`` add
        to the model's EOS ids; ``ignore_eos`` turns the EOS stop off."""
        return generate(
            self, prompts, max_new_tokens, sampling, stop_ids, on_token, speculative, ignore_eos
        )
