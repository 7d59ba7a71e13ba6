"""The runner: the one loop over layers; it runs forwards and knows nothing of requests.

``Engine.forward`` runs a [B, S] block of new tokens through the model, writing their K/V into
the cache and feeding the FLOP counter with what executed. Prefill and decode are the same
call with S = prompt length or S = 1. Dense is the case where every token runs every layer;
under a policy, ``ActiveTokens`` says which tokens run each layer and the others are gathered
out (never masked), so the counter and the clock see only what ran. Generation, drafting and
the step batch are built on this module (``runtime.generate``, ``runtime.speculative``,
``runtime.batch``); it imports none of them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

from quicksilver.accounting import FlopCounter, exit_head_flops
from quicksilver.models.formats import rounds_activations
from quicksilver.models.transformer import Block, Transformer, WidthGroups, run_linear
from quicksilver.policies.stack import Policy
from quicksilver.runtime.active import ActiveTokens
from quicksilver.runtime.attention import attend
from quicksilver.runtime.cache import KVCache, check_cache_fits
from quicksilver.runtime.compiled import CompiledDecode
from quicksilver.runtime.context import ForwardContext
from quicksilver.runtime.draft_shape import DraftShape

LayerObserver = Callable[[int, torch.Tensor], None]  # (layer, states [B, S, d])


def inference_unless_training(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run ``Engine.forward`` in inference mode, or with autograd inside
    ``Engine.gradients()``: training then goes through the very forward inference runs."""

    @functools.wraps(forward)
    def run(engine: Engine, *args, **kwargs) -> torch.Tensor:
        mode = torch.enable_grad() if engine.with_gradients else torch.inference_mode()
        with mode:
            return forward(engine, *args, **kwargs)

    return run


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
        # Weights on our kernels round activations to int8, which turns attention's last-bit
        # differences between k queries and one into different tokens: attend exactly.
        self.exact_attention = rounds_activations(model)
        # Dense decode steps and verify forwards as compiled graphs (``runtime.compiled``).
        self.compiled: CompiledDecode | None = (
            CompiledDecode(model, self.exact_attention) if compile else None
        )
        self.with_gradients = False  # see ``gradients``

    @contextlib.contextmanager
    def gradients(self) -> Iterator[None]:
        """Forwards in this block record autograd graphs instead of running in inference
        mode (``quicksilver.adapt`` trains adapters this way). Their caches must be made in
        the block too: a tensor made in inference mode cannot join a graph."""
        self.with_gradients = True
        try:
            yield
        finally:
            self.with_gradients = False

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
        cache = KVCache(self.config, batch_size, max_len, self.model.dtype)
        cache.exact_attention = self.exact_attention
        return cache

    def context(self, cache: KVCache, n_new: int) -> ForwardContext:
        """Place the next ``n_new`` tokens of every row in ``cache`` (reserving their slots)."""
        return ForwardContext.next_block(cache, n_new, self.model.rope_for)

    @inference_unless_training
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
        (``speculative.self_draft``): only its layers run, at its width, every token alike
        (no policy decisions), its state read through its exit head if it has one (counted
        like every other exit head); it adds nothing to the dense-equivalent count, since plain
        decoding would not run it at all."""
        batch, n_new = tokens.shape
        policy = self.policy
        dense = policy is None or policy.is_off or draft is not None
        if (
            self.compiled is not None
            and draft is None
            and dense
            and context is None
            and observe is None
            and (logits_at == "all" or (logits_at == "last" and n_new == 1))
            and self.compiled.supports(cache, n_new)
        ):
            logits = self._compiled_forward(tokens, cache)
            return logits[:, 0] if logits_at == "last" else logits
        context = context or self.context(cache, n_new)
        if isinstance(logits_at, str):
            head_rows = batch if logits_at == "last" else batch * n_new
        else:
            head_rows = batch * len(logits_at)
        dense_pairs = context.attended_pairs()
        if draft is None:
            self.counter.add_dense_equivalent(batch * n_new, dense_pairs, head_rows)
        active = None if dense else ActiveTokens(policy, self.model, context, self.counter)
        h = self.model.embed_tokens(tokens, context.positions)
        self.counter.add_embedding(batch * n_new)
        h = self._layers(h, context, dense_pairs, active, observe, draft)
        if isinstance(logits_at, str):
            h = h[:, -1] if logits_at == "last" else h
        else:
            h = h[:, logits_at]
        rows = h.shape[0] * (h.shape[1] if h.dim() == 3 else 1)
        exits = draft is not None and draft.exit_layer is not None
        if exits and self.model.exit_heads is not None:
            h = self.model.lens_state(h, draft.exit_layer)  # an early exit through its head
            self.counter.add_checks(exit_head_flops(self.config, rows))
        self.counter.add_head(rows)
        return self.model.logits(h)

    def _layers(
        self,
        h: torch.Tensor,
        context: ForwardContext,
        dense_pairs: int,
        active: ActiveTokens | None,
        observe: LayerObserver | None,
        draft: DraftShape | None,
    ) -> torch.Tensor:
        """The [B, S, d] block through every layer that runs: all its tokens (dense, or a
        draft's layers), or the tokens ``active`` lets through each layer, gathered out."""
        batch, n_new = h.shape[:2]
        counter = self.counter
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
        if active is not None:
            active.leave(flat)
        return flat.view(batch, n_new, -1)

    def _compiled_forward(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """[B, n] new tokens through the compiled graph -> logits [B, n, V]; counted like the
        eager forward, with attention over the slots the graph actually read (its bucket,
        masked entries too)."""
        batch, n_new = tokens.shape
        slots, _ = cache.reserve(n_new)
        read_len = self.compiled.read_len(cache, slots)
        logits = self.compiled(tokens, cache, slots, read_len)
        pairs = batch * n_new * read_len
        counter = self.counter
        counter.add_dense_equivalent(batch * n_new, pairs, batch * n_new)
        counter.add_embedding(batch * n_new)
        counter.add_every_layer(batch * n_new, pairs)
        counter.add_weight_read(0, self.model.layer_weight_bytes() * self.config.n_layers)
        counter.add_head(batch * n_new)
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
