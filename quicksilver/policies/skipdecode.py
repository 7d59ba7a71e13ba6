"""SkipDecode (arXiv 2307.02628): layer skipping that works with batching and a KV cache.

Every generated position k gets one number of computed layers n_k, shared by the whole batch,
from a schedule that decays from ``max_layers`` to ``min_layers`` over ``decay_length``
generated tokens (linear, or ``(k / decay_length) ** power``). The bottom ``warmup_layers``
always run; the skipped block is the ``L - n_k`` layers just above them; the top layers
always run. Prompt positions run every layer.

Why no K/V is ever recomputed or copied: the schedule never increases, so the block a position
skips contains the block of every earlier position. A layer that position k runs was run by
every earlier position (its K/V exist), and the K/V that k leaves unwritten in a skipped layer
are never read, because every later position skips that layer too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quicksilver.accounting import decode_flops_per_token
from quicksilver.models.config import ModelConfig
from quicksilver.policies.base import Mechanism, PolicyConfigError


@dataclass
class SkipDecode(Mechanism):
    name = "skipdecode"
    summary = "batch-wide layer skipping per generated position, on a decaying schedule"

    max_layers: int | None = None
    min_layers: int | None = None
    decay_length: int = 128
    warmup_layers: int = 1
    power: float = 1.0

    def validate(self) -> None:
        if (self.max_layers is None) != (self.min_layers is None):
            raise PolicyConfigError("skipdecode needs both max_layers and min_layers, or neither")
        if self.max_layers is not None and self.min_layers > self.max_layers:
            raise PolicyConfigError(
                f"skipdecode.min_layers ({self.min_layers}) must not exceed max_layers "
                f"({self.max_layers}): the schedule only decreases"
            )
        if self.decay_length < 1:
            raise PolicyConfigError(
                f"skipdecode.decay_length must be >= 1 generated token, got {self.decay_length}"
            )
        if self.warmup_layers < 0 or not (math.isfinite(self.power) and self.power > 0):
            raise PolicyConfigError(
                "skipdecode needs warmup_layers >= 0 and a power > 0, got "
                f"{self.warmup_layers} and {self.power}"
            )

        if self.max_layers is not None:  # sampled: a decay length may be huge
            steps = torch.linspace(0, self.decay_length + 1, 4096).floor().long()
            layers = self.layers_at(steps, self.max_layers)
            assert bool((layers[1:] <= layers[:-1]).all()), "the schedule must never increase"

    def check_model(self, config: ModelConfig) -> None:
        depth = config.n_layers
        if self.max_layers > depth:
            raise PolicyConfigError(
                f"skipdecode.max_layers = {self.max_layers} exceeds this model's {depth} layers"
            )
        if self.min_layers <= self.warmup_layers:
            raise PolicyConfigError(
                f"skipdecode.min_layers ({self.min_layers}) must exceed warmup_layers "
                f"({self.warmup_layers}): at least one layer above the skipped block must run"
            )

    @property
    def is_off(self) -> bool:
        return self.max_layers is None

    def layers_at(self, steps: torch.Tensor, n_layers: int) -> torch.Tensor:
        """Computed layers for each generation step (-1 or less: a prompt position)."""
        progress = (steps.clamp(min=0).float() / self.decay_length).clamp(max=1.0) ** self.power
        span = self.max_layers - self.min_layers
        layers = self.max_layers - torch.floor(span * progress + 1e-6).long()
        return torch.where(steps < 0, n_layers, layers)

    def layer_plan(self, steps: torch.Tensor, n_layers: int) -> torch.Tensor | None:
        layers = self.layers_at(steps, n_layers)
        index = torch.arange(n_layers)
        first = self.warmup_layers
        skipped = (index >= first) & (index < first + (n_layers - layers).unsqueeze(1))
        return ~skipped


def schedule_for_speedup(
    config: ModelConfig,
    target: float,
    new_tokens: int,
    decay_length: int | None = None,
    warmup_layers: int = 1,
    power: float = 1.0,
) -> SkipDecode:
    """The gentlest schedule whose decode FLOPs, averaged over the decode steps of
    ``new_tokens`` generated tokens (the first comes from the prompt's forward), are at most
    1 / ``target`` of the dense model's (`decode_flops_per_token`: the LM head does not
    shrink, so e.g. SmolLM2-135M, whose head weighs as much as 8 of its 30 layers, needs
    ~11 layers on average for 2x). Decoding is bound by reading weights, which scale like
    these FLOPs, so measured speedups come close. Prefers the deepest start (early tokens,
    which set the context, keep most layers), then the largest average depth."""
    n_layers = config.n_layers
    if not target >= 1:
        raise PolicyConfigError(f"the target speedup must be >= 1, got {target}")
    if new_tokens < 1:
        raise PolicyConfigError(f"the schedule needs >= 1 generated token, got {new_tokens}")
    steps = torch.arange(max(new_tokens - 1, 1))  # the first token comes from the prompt's pass
    decay = decay_length or len(steps)
    budget = decode_flops_per_token(config, n_layers) / target
    best: tuple[int, float, SkipDecode] | None = None
    for top in range(n_layers, warmup_layers, -1):
        for bottom in range(top, warmup_layers, -1):
            policy = SkipDecode(top, bottom, decay, warmup_layers, power)
            mean = float(policy.layers_at(steps, n_layers).float().mean())
            cost = decode_flops_per_token(config, mean)
            if cost <= budget * (1 + 1e-9) and (best is None or (top, mean) > best[:2]):
                best = (top, mean, policy)
    if best is None:
        fastest = decode_flops_per_token(config, n_layers) / decode_flops_per_token(
            config, warmup_layers + 1
        )
        raise PolicyConfigError(
            f"no schedule reaches {target}x on this {n_layers}-layer model with "
            f"{warmup_layers} warm-up layer(s): running {warmup_layers + 1} layers per token "
            f"(plus the LM head) gives at most {fastest:.2f}x"
        )
    return best[2]
