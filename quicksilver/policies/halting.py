"""Dynamic Token Halting (QuickSilver, arXiv 2506.22396): a token whose state has stopped
changing stops running layers; its frozen state goes to the final norm and the LM head.

Signals (a token halts when every enabled one is under its threshold):
- ``drift``: ||h_l - h_(l-1)||, the paper's absolute update size (default there: 0.045);
- ``relative_drift``: the same divided by ||h_l||, since residual norms grow with depth;
- ``entropy_bits``: entropy of the logit-lens distribution softmax(head(norm(h))) (paper:
  1.15 bits). It costs one LM-head product per checked token (~8 layers of SmolLM2), counted;
- ``lens_vocab``: compute that entropy over the first K vocabulary ids only (the most
  frequent pieces of a BPE vocabulary): our cheap variant, K / V of the full check's cost;
- ``patience``: our stability signal — the other signals must hold at this many
  consecutive checks, so a single quiet layer does not stop a token.
Checks run after layers ``min_layer``, ``min_layer + interval``, ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quicksilver.accounting import drift_check_flops
from quicksilver.models.config import ModelConfig
from quicksilver.policies.base import (
    Decision,
    LayerView,
    Mechanism,
    PolicyConfigError,
    check_layer,
    check_threshold,
)


@dataclass
class TokenHalting(Mechanism):
    name = "halting"
    summary = "freeze tokens whose state stopped changing (Dynamic Token Halting)"
    knobs = ("drift", "relative_drift", "entropy_bits")
    savings = frozenset({"prompt_flops", "decode_flops"})

    drift: float | None = None
    relative_drift: float | None = None
    entropy_bits: float | None = None
    lens_vocab: int | None = None
    patience: int = 1
    min_layer: int = 8
    interval: int = 1

    def validate(self) -> None:
        for key in ("drift", "relative_drift", "entropy_bits"):
            check_threshold(self.name, key, getattr(self, key))
        if self.lens_vocab is not None and self.lens_vocab < 2:
            raise PolicyConfigError(f"halting.lens_vocab must be >= 2, got {self.lens_vocab}")
        if self.patience < 1 or self.interval < 1 or self.min_layer < 0:
            raise PolicyConfigError(
                "halting.patience and halting.interval must be >= 1 and halting.min_layer "
                f">= 0, got {self.patience}, {self.interval}, {self.min_layer}"
            )

    def check_model(self, config: ModelConfig) -> None:
        check_layer(self.name, "min_layer", self.min_layer, config)

    @property
    def is_off(self) -> bool:
        return self.drift is None and self.relative_drift is None and self.entropy_bits is None

    def decides_after(self, layer: int) -> bool:
        return layer >= self.min_layer and (layer - self.min_layer) % self.interval == 0

    def after_layer(self, view: LayerView) -> Decision | None:
        if self.is_off or not self.decides_after(view.layer):
            return None
        quiet = torch.ones(len(view.index), dtype=torch.bool)
        d = view.after.shape[-1]
        if self.drift is not None or self.relative_drift is not None:
            moved = (view.after - view.before).float().norm(dim=-1)
            relative = self.relative_drift is not None
            view.count(drift_check_flops(d, len(view.index), relative))
            if self.drift is not None:
                quiet &= moved < self.drift
            if relative:
                quiet &= moved < self.relative_drift * view.after.float().norm(dim=-1)
        if self.entropy_bits is not None:
            quiet &= view.lens_entropy(self.lens_vocab) < self.entropy_bits
        streak = view.state.streak
        streak[view.index] = torch.where(quiet, streak[view.index] + 1, 0)
        return Decision(halt=streak[view.index] >= self.patience)
