"""Low-rank adapters (LoRA, Hu et al. 2021) on the linear layers of every block.

Each adapted weight ``W`` [out, in] gains ``scale * B @ A`` with ``A`` [rank, in] and ``B``
[out, rank]. ``B`` starts at zero, so an untrained adapter is the frozen model exactly, and
only ``A`` and ``B`` ever receive gradients. During training the update is added to the
layer's output by a forward hook (the model's own modules and the engine's forward are
untouched); for inference it is merged into the weights once, before any quantisation, so
an adapted model decodes at exactly the frozen model's cost.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from quicksilver.models.transformer import Linear, Transformer

# The block linears an adapter covers (the LM head and embeddings stay frozen and shared).
TARGETS = ("attn.qkv", "attn.out", "mlp.up", "mlp.down")


def target_names(model: Transformer) -> list[str]:
    """Parameter-style names of the adapted linears, e.g. ``blocks.3.attn.qkv``."""
    return [f"blocks.{i}.{part}" for i in range(len(model.blocks)) for part in TARGETS]


class LowRankUpdate(nn.Module):
    """``x -> scale * (x A^T) B^T`` for one linear layer, kept in float32."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))  # as torch.nn.Linear initialises
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self.a.T @ self.b.T) * self.scale

    def delta(self) -> torch.Tensor:
        """The dense weight update [out, in] this adapter stands for."""
        return (self.b @ self.a) * self.scale


class LoRA(nn.Module):
    """One ``LowRankUpdate`` per adapted linear of a model, keyed by the linear's name."""

    def __init__(self, model: Transformer, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"the adapter rank must be >= 1, got {rank}")
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else 2 * rank)
        self.updates = nn.ModuleDict()
        for name in target_names(model):
            linear = model.get_submodule(name)
            update = LowRankUpdate(linear.in_features, linear.out_features, rank, self.alpha)
            self.updates[name.replace(".", "/")] = update  # ModuleDict keys may not hold dots

    def named_updates(self) -> Iterator[tuple[str, LowRankUpdate]]:
        for key, update in self.updates.items():
            yield key.replace("/", "."), update

    def attach(self, model: Transformer) -> list[RemovableHandle]:
        """Add each update to its linear's output (hooks; remove the handles to detach)."""
        handles = []
        for name, update in self.named_updates():
            linear = model.get_submodule(name)
            if not isinstance(linear, Linear) or linear.packed is not None:
                raise ValueError(
                    f"{name} must be a float Linear without a pre-packed weight to train on"
                )
            handles.append(linear.register_forward_hook(_adding(update)))
        return handles

    def deltas(self) -> dict[str, torch.Tensor]:
        """Weight updates by parameter name (``blocks.3.attn.qkv.weight``), for merging."""
        with torch.no_grad():
            return {f"{name}.weight": update.delta() for name, update in self.named_updates()}


def _adding(update: LowRankUpdate):
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
        return output + update(inputs[0]).to(output.dtype)

    return hook


def merge_into(model: Transformer, deltas: dict[str, torch.Tensor]) -> None:
    """Add the updates to a float model's weights in place (tests and training evaluation;
    loading merges while the weights stream in, see ``files.merging``)."""
    with torch.no_grad():
        for key, delta in deltas.items():
            weight = model.get_parameter(key)
            weight.copy_((weight.float() + delta).to(weight.dtype))
        model.set_fast_path(any(linear.packed is not None for linear in model.linears()))
