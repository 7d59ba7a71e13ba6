"""Who runs each layer under a policy, and what the others leave in the cache.

``ActiveTokens`` follows one forward's tokens (flattened to B * S) through the layers: which
still run (halted, merged-away and padding tokens do not; a layer plan may skip layers), at
which weight width, and what a token that no longer runs a layer writes to its K/V (the
policy's declared treatment). After each layer it asks the mechanisms that act there and
applies their decisions. The runner calls it; it never loops over layers itself.
"""

from __future__ import annotations

import torch

from quicksilver.accounting import FlopCounter, exit_head_flops, kv_weight_bytes
from quicksilver.models.transformer import Block, Transformer, WidthGroups
from quicksilver.policies.base import Decision, LayerView, Mechanism, TokenState
from quicksilver.policies.stack import Policy
from quicksilver.runtime.context import ForwardContext


class ActiveTokens:
    def __init__(
        self, policy: Policy, model: Transformer, context: ForwardContext, counter: FlopCounter
    ) -> None:
        self.policy = policy
        self.model = model
        self.context = context
        self.counter = counter
        self.state = TokenState.start(context.real())
        for mechanism in policy.active:
            mechanism.begin(self.state)
        n = context.batch * context.seq
        self.n_tokens = n
        self.rows_of = context.rows_of()
        self.slot_of = context.slots.reshape(-1)
        self.real_index = torch.nonzero(self.state.active, as_tuple=True)[0]
        self.narrowing = policy.narrowing
        self.treatment = policy.kv_treatment
        self.size_weighted = policy.size_weighted
        cache = context.cache
        if cache.prompt_end is not None:
            steps = self.slot_of - cache.prompt_end[self.rows_of]
        else:
            steps = torch.full_like(self.slot_of, -1)
        self.plan = policy.layer_plan(steps, model.config.n_layers)
        self.exits: list[tuple[int, torch.Tensor]] = []  # (layer, tokens halted after it)

    def running(self, layer: int) -> torch.Tensor | None:
        """Flat indices of the tokens that run ``layer``, or None when every token does and
        the cache holds nothing the plain attention cannot read (the dense path)."""
        running = (
            self.state.active if self.plan is None else self.state.active & self.plan[:, layer]
        )
        if bool(running.all()) and not self.context.cache.adapted:
            return None
        return torch.nonzero(running, as_tuple=True)[0]

    def widths(self, index: torch.Tensor | None) -> WidthGroups | None:
        """Rows per weight width; None when every row runs at the model's precision."""
        if self.narrowing is None:
            return None
        bits = self.state.bits if index is None else self.state.bits[index]
        values = torch.unique(bits).tolist()
        if values == [0]:
            return None
        groups = [(torch.nonzero(bits == b, as_tuple=True)[0], b) for b in values]
        return WidthGroups(groups)

    def count_weights(self, widths: WidthGroups | None, full_bytes: int) -> None:
        """Each width present in a layer reads that layer's weights once at that width."""
        for _, bits in widths.groups if widths else [(None, 0)]:
            n_bytes = (
                full_bytes
                if bits == 0
                else self.narrowing.layer_weight_bytes(self.model.config, bits)
            )
            self.counter.add_weight_read(bits, n_bytes)

    def log_sizes(self, layer: int) -> torch.Tensor | None:
        """The layer's [B, T] log(tokens an entry stands for), brought up to date, when
        attention is size-weighted (a halted super-token's entry included)."""
        if not self.size_weighted:
            return None
        index = self.real_index
        return self.context.cache.set_log_sizes(
            layer, self.rows_of[index], self.slot_of[index], self.state.size[index].log()
        )

    def leave_kv(self, layer: int, block: Block, flat: torch.Tensor) -> None:
        """What tokens that do not run ``layer`` leave in its cache."""
        cache, state = self.context.cache, self.state
        merged = torch.nonzero(state.merged, as_tuple=True)[0]
        if len(merged):
            cache.hide(layer, self.rows_of[merged], self.slot_of[merged])
        frozen = torch.nonzero(state.halted, as_tuple=True)[0]
        if not len(frozen):
            return
        rows, slots = self.rows_of[frozen], self.slot_of[frozen]
        if self.treatment == "skip":
            cache.hide(layer, rows, slots)
        elif self.treatment == "zero":
            cache.k[layer, rows, :, slots] = 0
            cache.v[layer, rows, :, slots] = 0
        else:
            attn_in = block.attention_input(flat[frozen].unsqueeze(1))
            k, v = block.attn.project_kv(attn_in, self.context.rope_at(frozen))
            cache.k[layer, rows, :, slots] = k[:, 0]
            cache.v[layer, rows, :, slots] = v[:, 0]
            self.counter.add_kv_projection(layer, len(frozen))
            qkv = block.attn.qkv
            per_weight = qkv.storage_bytes / (qkv.in_features * qkv.out_features)
            self.counter.add_weight_read(0, kv_weight_bytes(self.model.config, per_weight))

    def after_layer(
        self,
        layer: int,
        index: torch.Tensor,
        before: torch.Tensor,
        after: torch.Tensor,
        flat: torch.Tensor,
    ) -> None:
        """Ask the mechanisms that act after ``layer`` about the tokens that ran it."""
        if layer == self.model.config.n_layers - 1 or not len(index):
            return
        deciders = [p for p in self.policy.active if p.decides_after(layer)]
        if not deciders:
            return
        view = LayerView(layer, self.model, self.state, index, before, after)
        self._apply(_combine(deciders, view), view, flat)

    def leave(self, flat: torch.Tensor) -> None:
        """After the last layer: with fitted exit heads, halted tokens leave through their
        layer's head, so the LM head reads the tuned prediction their halting was judged on
        (their K/V in later layers came from the unmapped frozen state). The maps are counted.
        """
        for layer, tokens in self.exits:
            flat[tokens] = self.model.lens_state(flat[tokens], layer)
            self.counter.add_checks(exit_head_flops(self.model.config, len(tokens)))

    def _apply(self, decision: Decision, view: LayerView, flat: torch.Tensor) -> None:
        state, index = self.state, view.index
        self.counter.add_checks(view.check_flops)
        if decision.halt is not None and bool(decision.halt.any()):
            stopped = index[decision.halt]
            state.active[stopped] = False
            state.halted[stopped] = True
            if self.model.exit_heads is not None:
                self.exits.append((view.layer, stopped))
        if decision.merge_from is not None and len(decision.merge_from):
            stopped = index[decision.merge_from]
            folds = decision.merge_into >= 0
            state.active[stopped] = False
            state.merged[stopped[folds]] = True
            # With nobody on its right to fold into, a token just halts: its K/V then follow
            # the halting treatment instead of vanishing.
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


def _combine(deciders: list[Mechanism], view: LayerView) -> Decision:
    """Combine the mechanisms' decisions: halts are OR-ed, merges and widths concatenated. A
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
