"""Contextual Token Fusion (QuickSilver): a token whose state is close to a recent neighbour's
is folded into the token on its right, so deeper layers run a shorter sequence.

Causality decides the shape of this mechanism. In teacher-forced evaluation every position
needs its own logits, computed from tokens up to it only. So:
- the token that stops (the *source* s) is chosen from what it can see: its distance to the
  nearest of its previous ``window`` active tokens (``l2``, ``relative_l2`` =
  ||h_s - h_u|| / ||h_s||, or ``cosine`` = 1 - cos). A rule that looked at a later token
  (e.g. "s is close to s + 1") would let that later token decide s's own logits;
- s stops running layers and keeps its pre-fusion state for its own prediction (the explicit
  unmerge: every position still gets a logit row);
- s merges into the **right-most member** of the group: the next active token t of its row,
  whose state becomes the size-weighted mean of both. The super-token keeps t's cache slot
  and t's position index (RoPE angle / learned position of t); only tokens at or after t
  read it. From the next layer on, s writes no K/V.
- with ``size_weighted`` the attention score of a super-token gets + log(size), as in ToMe's
  proportional attention, so a group of n tokens keeps roughly n tokens' weight.

Ranks alternate as in ToMe's bipartite matching: on even layers only tokens at even ranks
among a row's active tokens may fold (odd ranks on odd layers), so a receiving token never
folds in the same layer. ``max_group`` stops tokens that already stand for ``max_group``
tokens from folding further; the check is on the folding token only (checking the receiver's
size would let a later token decide), so a receiver can end up larger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quicksilver.accounting import fusion_check_flops
from quicksilver.models.config import ModelConfig
from quicksilver.policies.base import (
    Decision,
    LayerView,
    Mechanism,
    PolicyConfigError,
    check_layer,
    check_threshold,
)

METRICS = ("l2", "relative_l2", "cosine")


def distance_to_previous(states: torch.Tensor, window: int, metric: str) -> torch.Tensor:
    """For each of n tokens (in order), its smallest distance to any of the ``window``
    tokens before it ([n]; inf for the first token)."""
    n = states.shape[0]
    if n < 2:  # nothing before any token: no candidate to compare with
        return states.new_full((n,), float("inf"), dtype=torch.float32)
    x = states.float()
    window = min(window, n - 1)  # no token has more than n - 1 tokens before it
    offsets = torch.arange(1, window + 1)
    earlier = torch.arange(n).unsqueeze(1) - offsets  # [n, window]
    valid = earlier >= 0
    other = x[earlier.clamp(min=0)]  # [n, window, d]
    here = x.unsqueeze(1)
    if metric == "cosine":
        dist = 1 - F.cosine_similarity(here, other, dim=-1)
    else:
        dist = (here - other).norm(dim=-1)
        if metric == "relative_l2":
            dist = dist / here.norm(dim=-1).clamp(min=1e-12)
    return dist.masked_fill(~valid, float("inf")).min(dim=1).values


def fold_right(
    states: torch.Tensor,
    sizes: torch.Tensor,
    *,
    threshold: float,
    window: int,
    metric: str,
    max_group: int,
    parity: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sources, targets) among n tokens in order: a source at rank parity ``parity``, close to
    a previous token and standing for fewer than ``max_group`` tokens, folds into the next
    token (target = source + 1, or -1 for the last token: it stops, folding into nothing)."""
    n = states.shape[0]
    ranks = torch.arange(n)
    close = distance_to_previous(states, window, metric) < threshold
    chosen = (ranks % 2 == parity) & close & (sizes < max_group)
    sources = torch.nonzero(chosen, as_tuple=True)[0]
    targets = torch.where(sources + 1 < n, sources + 1, -1)
    return sources, targets


@dataclass
class TokenFusion(Mechanism):
    name = "fusion"
    summary = "fold redundant tokens into right-hand super-tokens (Contextual Token Fusion)"
    choices = {"metric": METRICS}
    knobs = ("threshold",)
    # A decoded token is alone in its forward, with nobody to fold into: prompt work only.
    savings = frozenset({"prompt_flops"})

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

    @property
    def attention_bias(self) -> bool:
        return not self.is_off and self.size_weighted

    def decides_after(self, layer: int) -> bool:
        return layer >= self.start_layer and (layer - self.start_layer) % self.interval == 0

    def after_layer(self, view: LayerView) -> Decision | None:
        if self.is_off or not self.decides_after(view.layer):
            return None
        sources, targets = [], []
        _, counts = torch.unique_consecutive(view.rows, return_counts=True)
        offset = 0
        hidden = view.after.shape[-1]
        for count in counts.tolist():
            part = slice(offset, offset + count)
            src, dst = fold_right(
                view.after[part],
                view.state.size[view.index[part]],
                threshold=self.threshold,
                window=self.window,
                metric=self.metric,
                max_group=self.max_group,
                parity=view.layer % 2,
            )
            sources.append(src + offset)
            targets.append(torch.where(dst >= 0, dst + offset, -1))
            # per row: the window is capped by the tokens the row has here, not the setting
            view.count(fusion_check_flops(hidden, self.window, count))
            offset += count
        return Decision(merge_from=torch.cat(sources), merge_into=torch.cat(targets))
