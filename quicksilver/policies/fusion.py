"""Contextual Token Fusion (QuickSilver): neighbouring tokens whose states are close are
merged into one super-token, so deeper layers run a shorter sequence.

Causality is kept by construction:
- a token only ever merges into a token on its **right** (the super-token sits at the
  right-most member's slot and keeps that member's position index for RoPE / learned
  positions), so the super-token depends on nothing after its own position;
- the left member stops there and keeps its pre-fusion state for its own prediction (the
  explicit unmerge: every position still gets a logit row, and position t's logits never
  read a token after t);
- from the merge layer on, the left member writes no K/V; the super-token's K/V stand for
  the group. With ``size_weighted`` the attention score of a super-token gets + log(size),
  as in ToMe's proportional attention, so a group of n keeps roughly n tokens' weight.

Matching is bipartite, as in ToMe: among a row's active tokens, those at even (or, on odd
layers, odd) ranks are sources and may merge into a target among the next ``window`` active
tokens; a target takes at most one source per layer, so no chains form inside one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quicksilver.models.config import ModelConfig
from quicksilver.policies.base import (
    Decision,
    LayerView,
    Policy,
    PolicyConfigError,
    check_layer,
    check_threshold,
)

METRICS = ("l2", "relative_l2", "cosine")


def neighbour_distances(
    states: torch.Tensor, window: int, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance from each of n tokens (in order) to each of its next ``window`` neighbours:
    ([n, window] distances, inf past the end; [n, window] neighbour indices)."""
    n = states.shape[0]
    x = states.float()
    offsets = torch.arange(1, window + 1)
    partner = torch.arange(n).unsqueeze(1) + offsets  # [n, window]
    valid = partner < n
    partner = partner.clamp(max=max(n - 1, 0))
    other = x[partner]  # [n, window, d]
    here = x.unsqueeze(1)
    if metric == "cosine":
        dist = 1 - F.cosine_similarity(here, other, dim=-1)
    else:
        dist = (here - other).norm(dim=-1)
        if metric == "relative_l2":
            dist = dist / other.norm(dim=-1).clamp(min=1e-12)
    return dist.masked_fill(~valid, float("inf")), partner


def match_right(
    states: torch.Tensor,
    sizes: torch.Tensor,
    *,
    threshold: float,
    window: int,
    metric: str,
    max_group: int,
    parity: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (source, target) of token indices, target to the right of its source, that
    should merge: sources have rank parity ``parity``, targets the other parity, the nearest
    qualifying target is chosen, and a target takes only its right-most source."""
    n = states.shape[0]
    empty = torch.zeros(0, dtype=torch.long)
    if n < 2:
        return empty, empty
    dist, partner = neighbour_distances(states, window, metric)
    ranks = torch.arange(n)
    is_source = (ranks % 2) == parity
    ok = (partner % 2 != parity) & (dist < threshold)
    ok &= (sizes.unsqueeze(1) + sizes[partner]) <= max_group
    ok &= is_source.unsqueeze(1)
    dist = dist.masked_fill(~ok, float("inf"))
    best, choice = dist.min(dim=1)
    sources = torch.nonzero(best.isfinite(), as_tuple=True)[0]
    if len(sources) == 0:
        return empty, empty
    targets = partner[sources, choice[sources]]
    # One source per target: keep the right-most (closest in sequence order).
    last_source = torch.full((n,), -1, dtype=torch.long)
    last_source.scatter_reduce_(0, targets, sources, reduce="amax")
    keep = last_source[targets] == sources
    return sources[keep], targets[keep]


@dataclass
class TokenFusion(Policy):
    name = "fusion"
    summary = "merge close neighbours into right-most super-tokens (Contextual Token Fusion)"

    threshold: float | None = None
    metric: str = "relative_l2"
    window: int = 1  # 1 = adjacent tokens only
    max_group: int = 2
    start_layer: int = 8
    interval: int = 1
    size_weighted: bool = True

    def validate(self) -> None:
        check_threshold(self.name, "threshold", self.threshold)
        if self.metric not in METRICS:
            raise PolicyConfigError(
                f"fusion.metric must be one of {', '.join(METRICS)}, got {self.metric!r}"
            )
        if self.window < 1 or self.max_group < 2 or self.interval < 1 or self.start_layer < 0:
            raise PolicyConfigError(
                "fusion needs window >= 1, max_group >= 2, interval >= 1 and start_layer >= 0; "
                f"got window={self.window}, max_group={self.max_group}, "
                f"interval={self.interval}, start_layer={self.start_layer}"
            )

    def check_model(self, config: ModelConfig) -> None:
        check_layer(self.name, "start_layer", self.start_layer, config)

    @property
    def is_off(self) -> bool:
        return self.threshold is None

    def after_layer(self, view: LayerView) -> Decision | None:
        layer = view.layer
        if self.is_off or layer < self.start_layer or (layer - self.start_layer) % self.interval:
            return None
        rows = view.rows
        sources, targets = [], []
        _, counts = torch.unique_consecutive(rows, return_counts=True)
        offset = 0
        for count in counts.tolist():
            part = slice(offset, offset + count)
            src, dst = match_right(
                view.after[part],
                view.state.size[view.index[part]],
                threshold=self.threshold,
                window=self.window,
                metric=self.metric,
                max_group=self.max_group,
                parity=layer % 2,
            )
            sources.append(src + offset)
            targets.append(dst + offset)
            offset += count
        d = view.after.shape[-1]
        view.count(3 * d * self.window * len(view.index))  # one distance per candidate pair
        return Decision(merge_from=torch.cat(sources), merge_into=torch.cat(targets))
