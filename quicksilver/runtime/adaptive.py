"""The layer loop under a policy: only the active tokens run each layer.

Tokens of the [B, S] block are flattened to [B*S, d]. At each layer the active ones are
gathered (``index_select``), run through the block's matmuls as one [N, d] batch, attend per
row to that row's cache, and are scattered back. Tokens that stopped keep their state; what
they leave in the KV cache follows the policy's treatment. The FLOP counter is fed with the
shapes that ran (N tokens, the attention pairs each query really scored, the K/V projections of
propagated tokens, every signal a policy computed), so savings are never counted for work that
executed. While every token is active and plain, a layer takes the dense path unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from quicksilver.accounting import FlopCounter, layer_weight_count, weight_bytes_of_layer
from quicksilver.models.config import ModelConfig
from quicksilver.models.transformer import Block, Step, WidthGroups, run_linear
from quicksilver.policies.base import Decision, LayerView, Mechanism, TokenState
from quicksilver.policies.stack import Policy
from quicksilver.runtime.cache import KVCache

if TYPE_CHECKING:
    from quicksilver.runtime.engine import Engine


# Forwards of at most this many tokens (decoding) run narrow widths through the int8 kernel.
INT8_KERNEL_MAX_TOKENS = 16


def width_groups(bits: torch.Tensor, n_tokens: int) -> WidthGroups | None:
    """Rows per weight width; None when every row runs at the model's precision. The kernel
    choice depends on the forward's size only, so it is the same for every token in it."""
    values = torch.unique(bits).tolist()
    if values == [0]:
        return None
    groups = [(torch.nonzero(bits == b, as_tuple=True)[0], b) for b in values]
    return WidthGroups(groups, few_rows=n_tokens <= INT8_KERNEL_MAX_TOKENS)


class _Rope:
    """RoPE tables of the flattened block, gathered per token subset."""

    def __init__(self, step: Step) -> None:
        if step.rope is None:
            self.cos = self.sin = None
        else:
            cos, sin = step.rope
            self.cos = cos.reshape(-1, 1, 1, cos.shape[-1])
            self.sin = sin.reshape(-1, 1, 1, sin.shape[-1])

    def at(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cos is None:
            return None
        return self.cos[index], self.sin[index]


# Queries per attention call. Gathered queries are not a contiguous causal block, so the
# kernel cannot skip the masked upper triangle by itself; cutting the queries into chunks and
# giving each chunk only the keys up to its last query's slot skips most of it.
QUERY_CHUNK = 128


def attend_rows(
    q: torch.Tensor,
    rows: torch.Tensor,
    q_slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache: KVCache,
    visible: torch.Tensor,
    log_size: torch.Tensor | None,
) -> tuple[torch.Tensor, int]:
    """Attention of gathered queries q [N, heads, hd] (row-major order, slots increasing
    within a row) over their own rows' cache entries: slot j is read iff
    start <= j <= the query's slot, j is visible, and (with a sliding window) recent enough.
    Hidden entries are left out of the keys (gathered), not masked: their scores are never
    computed. Returns ([N, heads, hd], attended pairs)."""
    unique_rows, counts = torch.unique_consecutive(rows, return_counts=True)
    outputs, pairs, offset = [], 0, 0
    gqa = q.shape[1] != k_cache.shape[1]
    for row, count in zip(unique_rows.tolist(), counts.tolist(), strict=True):
        start = int(cache.start[row])
        for lo in range(offset, offset + count, QUERY_CHUNK):
            hi = min(lo + QUERY_CHUNK, offset + count)
            slots = q_slots[lo:hi].unsqueeze(1)
            first = start
            if cache.sliding_window:
                first = max(start, int(q_slots[lo]) - cache.sliding_window + 1)
            end = int(q_slots[hi - 1]) + 1
            shown = visible[row, first:end]
            if bool(shown.all()):
                keys = torch.arange(first, end)
                k, v = k_cache[row : row + 1, :, first:end], v_cache[row : row + 1, :, first:end]
            else:
                keys = first + torch.nonzero(shown, as_tuple=True)[0]
                k, v = k_cache[row : row + 1, :, keys], v_cache[row : row + 1, :, keys]
            allowed = keys <= slots
            if cache.sliding_window:
                allowed &= keys > slots - cache.sliding_window
            pairs += int(allowed.sum())
            if log_size is not None:
                bias = log_size[row, keys].to(q.dtype).expand(hi - lo, -1)
                mask = bias.masked_fill(~allowed, float("-inf"))
            else:
                mask = allowed
            out = F.scaled_dot_product_attention(
                q[lo:hi].transpose(0, 1).unsqueeze(0),
                k,
                v,
                attn_mask=mask.view(1, 1, hi - lo, len(keys)),
                enable_gqa=gqa,
            )
            outputs.append(out[0].transpose(0, 1))
        offset += count
    return torch.cat(outputs), pairs


def adaptive_forward(
    engine: Engine, tokens: torch.Tensor, cache: KVCache, step: Step, policy: Policy
) -> torch.Tensor:
    """Run tokens [B, S] through every layer under ``policy``; return final states [B, S, d]
    (halted and merged-away tokens keep the state they stopped with)."""
    model, counter, config = engine.model, engine.counter, engine.config
    batch, seq = tokens.shape
    real = (step.slots >= 0) & (step.slots >= cache.start.view(-1, 1))
    state = TokenState.start(real)
    for policy_part in policy.policies:
        if not policy_part.is_off:
            policy_part.begin(state)
    h = model.embed_tokens(tokens, step.positions)
    counter.add_embedding(batch * seq)
    flat = h.reshape(batch * seq, -1)
    rows_of = torch.arange(batch).repeat_interleave(seq)
    real_index = torch.nonzero(real.reshape(-1), as_tuple=True)[0]
    matryoshka = policy.get("matryoshka")
    narrow = matryoshka is not None and not matryoshka.is_off
    group_size = getattr(matryoshka, "group_size", None)
    slot_of = step.slots.reshape(-1)
    rope = _Rope(step)
    treatment = policy.kv_treatment
    weights_per_layer = layer_weight_count(config)
    full_bytes = weights_per_layer * flat.element_size()
    dense_pairs = step.attended_pairs(batch, seq)
    steps = (
        slot_of - cache.prompt_end if cache.prompt_end is not None else torch.full_like(slot_of, -1)
    )
    plan = policy.layer_plan(steps, config.n_layers)
    everyone = torch.arange(batch * seq)
    for i, block in enumerate(model.blocks):
        running = state.active if plan is None else state.active & plan[:, i]
        if bool(running.all()) and not cache.adapted:  # the dense path, maybe narrower
            widths = width_groups(state.bits, batch * seq) if narrow else None
            before = flat
            flat = block(flat.view(batch, seq, -1), step, cache.k[i], cache.v[i], widths)
            flat = flat.reshape(batch * seq, -1)
            index = everyone
            after = flat
            counter.add_layer(i, batch * seq, dense_pairs)
            _count_weights(counter, config, widths, full_bytes, group_size)
        else:
            index = torch.nonzero(running, as_tuple=True)[0]
            before = flat[index]
            _leave_kv(block, i, flat, state, cache, rows_of, slot_of, rope, treatment, counter)
            if not len(index):  # every token has stopped: the remaining layers run nothing
                continue
            widths = width_groups(state.bits[index], batch * seq) if narrow else None
            log_size = None
            if policy.size_weighted:  # entries of this layer carry log(tokens they stand for),
                log_size = cache.log_sizes()[i]  # a halted super-token's included
                log_size[rows_of[real_index], slot_of[real_index]] = state.size[real_index].log()
            after, pairs = _run_gathered(
                block, i, before, index, rows_of, slot_of, rope, cache, step, widths, log_size
            )
            flat[index] = after
            counter.add_layer(i, len(index), pairs)
            _count_weights(counter, config, widths, full_bytes, group_size)
        deciders = policy.deciders(i) if i < config.n_layers - 1 and len(index) else []
        if deciders:
            view = LayerView(i, model, state, index, before, after)
            _apply(_decide(deciders, view), view, flat, counter)
    return flat.view(batch, seq, -1)


def _count_weights(
    counter: FlopCounter,
    config: ModelConfig,
    widths: WidthGroups | None,
    full_bytes: int,
    group_size: int | None,
) -> None:
    """Each width present in a layer reads that layer's weights once at that width."""
    for _, bits in widths.groups if widths else [(None, 0)]:
        counter.add_weight_read(
            bits, full_bytes if bits == 0 else weight_bytes_of_layer(config, bits, group_size)
        )


def _leave_kv(
    block: Block,
    layer: int,
    flat: torch.Tensor,
    state: TokenState,
    cache: KVCache,
    rows_of: torch.Tensor,
    slot_of: torch.Tensor,
    rope: _Rope,
    treatment: str,
    counter: FlopCounter,
) -> None:
    """What tokens that do not run this layer leave in its cache."""
    visible = cache.visibility()
    merged = torch.nonzero(state.merged, as_tuple=True)[0]
    if len(merged):
        visible[layer, rows_of[merged], slot_of[merged]] = False
        cache.adapted = True
    frozen = torch.nonzero(state.halted, as_tuple=True)[0]
    if not len(frozen):
        return
    rows, slots = rows_of[frozen], slot_of[frozen]
    if treatment == "skip":
        visible[layer, rows, slots] = False
        cache.adapted = True
    elif treatment == "zero":
        cache.k[layer, rows, :, slots] = 0
        cache.v[layer, rows, :, slots] = 0
    else:
        attn_in = block.attention_input(flat[frozen].unsqueeze(1))
        k, v = block.attn.project_kv(attn_in, rope.at(frozen))
        cache.k[layer, rows, :, slots] = k[:, 0]
        cache.v[layer, rows, :, slots] = v[:, 0]
        counter.add_kv_projection(layer, len(frozen))
        kv_weights = 2 * block.attn.kv_dim * block.attn.qkv.in_features
        counter.add_weight_read(0, kv_weights * block.attn.qkv.weight.element_size())


def _run_gathered(
    block: Block,
    layer: int,
    x: torch.Tensor,
    index: torch.Tensor,
    rows_of: torch.Tensor,
    slot_of: torch.Tensor,
    rope: _Rope,
    cache: KVCache,
    step: Step,
    widths: WidthGroups | None,
    log_size: torch.Tensor | None,
) -> tuple[torch.Tensor, int]:
    rows, slots = rows_of[index], slot_of[index]
    k_cache, v_cache = cache.k[layer], cache.v[layer]
    visible = cache.visibility()[layer]
    pairs = [0]
    attn = block.attn

    reads = _one_call_reads(rows, slots, visible, cache)

    def attention(normed: torch.Tensor) -> torch.Tensor:
        q, k, v = attn.project(normed, rope.at(index), widths)  # [N, 1, heads, hd]
        k_cache[rows, :, slots] = k[:, 0]
        v_cache[rows, :, slots] = v[:, 0]
        if reads is not None:
            out, pairs[0] = _attend_decode(block, q, rows, reads, cache, layer, log_size)
        else:
            out, pairs[0] = attend_rows(
                q[:, 0], rows, slots, k_cache, v_cache, cache, visible, log_size
            )
        return run_linear(attn.out, out.reshape(len(index), 1, attn.q_dim), widths)

    out = block.run(x.unsqueeze(1), attention, widths)[:, 0]
    return out, pairs[0]


def _one_call_reads(
    rows: torch.Tensor, slots: torch.Tensor, visible: torch.Tensor, cache: KVCache
) -> torch.Tensor | None:
    """For a decoding step (one query per row, all at the same slot) whose queries read no
    hidden entry: which slots 0..slot each row's query reads ([N, slot + 1] bool: from the
    row's start, within the sliding window), so the rows can attend in one call. None
    otherwise: hidden entries must be gathered out of the keys, which the per-row path does."""
    if len(rows) > 1 and not bool((rows[1:] > rows[:-1]).all() & (slots == slots[0]).all()):
        return None
    slot = int(slots[0])
    keys = torch.arange(slot + 1)
    reads = keys >= cache.start[rows].unsqueeze(1)
    if cache.sliding_window:
        reads &= keys > slot - cache.sliding_window
    return reads if bool((visible[rows, : slot + 1] | ~reads).all()) else None


def _attend_decode(
    block: Block,
    q: torch.Tensor,
    rows: torch.Tensor,
    reads: torch.Tensor,
    cache: KVCache,
    layer: int,
    log_size: torch.Tensor | None,
) -> tuple[torch.Tensor, int]:
    """One query per row over the entries ``reads`` marks in its row's cache, all rows in
    one call. Left padding is masked, as on the dense path, and not counted."""
    n, end = reads.shape
    every_row = n == cache.batch_size
    keys_of = (lambda c: c[:, :, :end]) if every_row else (lambda c: c[rows, :, :end])
    bias = None
    if log_size is not None:
        # rounded to the model's dtype first, as on the per-row path
        bias = log_size[rows, :end].to(q.dtype).float().view(n, 1, 1, end)
    out = block.attn.attend_one(
        q, keys_of(cache.k[layer]), keys_of(cache.v[layer]), reads.view(n, 1, 1, end), bias
    )
    return out, int(reads.sum())


def _decide(deciders: list[Mechanism], view: LayerView) -> Decision:
    """Combine the policies' decisions: halts are OR-ed, merges and widths concatenated. A
    merge whose source halts at the same layer is dropped (the source just halts); a halting
    target still receives its source (the source's fate must not depend on a later token)."""
    n = len(view.index)
    halt = torch.zeros(n, dtype=torch.bool)
    sources, targets, bits = [], [], None
    for part in deciders:
        decision = part.after_layer(view)
        if decision is None:
            continue
        if decision.halt is not None:
            halt |= decision.halt
        if decision.merge_from is not None:
            sources.append(decision.merge_from)
            targets.append(decision.merge_into)
        if decision.bits is not None:
            bits = decision.bits if bits is None else torch.maximum(bits, decision.bits)
    merge_from = torch.cat(sources) if sources else torch.zeros(0, dtype=torch.long)
    merge_into = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    keep = ~halt[merge_from]  # a halting source just halts; a halting target still receives
    return Decision(halt, merge_from[keep], merge_into[keep], bits)


def _apply(decision: Decision, view: LayerView, flat: torch.Tensor, counter: FlopCounter) -> None:
    state, index = view.state, view.index
    counter.add_checks(view.check_flops)
    if decision.halt is not None and bool(decision.halt.any()):
        stopped = index[decision.halt]
        state.active[stopped] = False
        state.halted[stopped] = True
    if decision.merge_from is not None and len(decision.merge_from):
        stopped = index[decision.merge_from]
        folds = decision.merge_into >= 0
        state.active[stopped] = False
        state.merged[stopped[folds]] = True
        # With nobody on its right to fold into, a token just halts: its K/V then follow the
        # halting treatment instead of vanishing.
        state.halted[stopped[~folds]] = True
        src, dst = stopped[folds], index[decision.merge_into[folds]]
        size_src, size_dst = state.size[src], state.size[dst]
        total = size_src + size_dst
        mixed = (flat[src].float() * (size_src / total).unsqueeze(1)) + (
            flat[dst].float() * (size_dst / total).unsqueeze(1)
        )
        flat[dst] = mixed.to(flat.dtype)
        state.size[dst] = total
    if decision.bits is not None:
        chosen = decision.bits > 0
        state.bits[index[chosen]] = decision.bits[chosen]
