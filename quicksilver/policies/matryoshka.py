"""Adaptive Matryoshka Quantization (QuickSilver): per token, a weight width chosen from its
logit-lens entropy at one layer; the token's later matmuls run at that width.

What is quantised: the weights of every transformer block's linear layers (QKV, attention
output, MLP), once, into one int8 code per weight (per output channel, or per group of
``group_size`` inputs) whose 4 and 2 most significant bits are the int4 and int2 codes
(``quicksilver.quant``). Embeddings, norms, the LM head, activations and the KV cache stay
at the model's precision. Width per token: 8 bits if its entropy > ``entropy_high``, 2 if
< ``entropy_low``, else 4 (``lens_vocab``: entropy over the first K ids only, as in
halting); layers up to ``decision_layer`` run at full precision.
``fixed_bits`` instead runs every token at one width in every layer (the int8/int4/int2
dense baselines).

Kernels (``kernel``): torch's int8 weight-only matmul is real and, for bf16 activations and
a few rows at a time (decoding), faster than the bf16 product; for many rows (prefill,
evaluation) or fp32 activations it is slower. ``auto`` therefore runs every narrow product of
a forward through the int8 kernel when the forward has at most 16 tokens (the choice is per
forward, never per group, so a token's numbers do not depend on how many other tokens share
its width) (int4/int2 slices as int8 values with fixed low bits: real
arithmetic, int8 bytes read) and larger ones, or fp32 models, on weights dequantised from
the slice (simulated: the arithmetic of the narrow width, the speed of the dense product).
``int8`` forces the kernel, ``simulated`` never uses it. Per-group scales are always
simulated. The counter records layer-weight bytes at the nominal width, which is what a
packed int4/int2 kernel would read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quicksilver import quant
from quicksilver.accounting import weight_bytes_of_layer
from quicksilver.models.config import ModelConfig
from quicksilver.models.transformer import Linear, Transformer
from quicksilver.policies.base import (
    Decision,
    LayerView,
    Mechanism,
    PolicyConfigError,
    TokenState,
    check_layer,
    check_threshold,
)

WIDTHS = quant.SLICE_BITS


def _width_linear(linear: Linear, weight: torch.Tensor) -> Linear:
    """A Linear holding a dequantised weight, on the same fast path as the model's own."""
    narrow = Linear(linear.in_features, linear.out_features, linear.bias is not None)
    narrow.weight.data = weight
    if linear.bias is not None:
        narrow.bias.data = linear.bias.detach()
    if linear.packed is not None:
        narrow.pack()
    return narrow


@dataclass
class NarrowWeights:
    """One linear layer at one width: dequantised weights for the dense kernels, and the int8
    values and scales for torch's int8 weight-only kernel when it is used."""

    dense: Linear
    weight_int8: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    always_int8: bool = False

    def __call__(self, x: torch.Tensor, few_rows: bool = False) -> torch.Tensor:
        if self.weight_int8 is not None and (self.always_int8 or few_rows):
            return quant.int8_linear(x, self.weight_int8, self.scales, self.dense.bias)
        return self.dense(x)


def narrow_products(
    linear: Linear, group_size: int | None, kernel: str, widths: tuple[int, ...]
) -> dict[int, NarrowWeights]:
    """bits -> ``linear`` at that width, from one shared int8 code."""
    dtype = linear.weight.dtype
    codes = quant.quantize(linear.weight.detach(), group_size)
    int8_ok = (
        codes.n_groups == 1
        and quant.int8_kernel_available()
        and quant.int8_kernel_supports(dtype, linear.in_features)
    )
    if kernel == "int8" and not int8_ok:
        raise PolicyConfigError(
            "matryoshka.kernel = 'int8' needs a model dtype the int8 kernel supports and "
            "input widths that are multiples of 16; use kernel 'auto' or 'simulated'"
        )
    # fp32 activations gain nothing from the int8 kernel (it is a scalar loop for them).
    use_int8 = int8_ok and (kernel == "int8" or (kernel == "auto" and dtype != torch.float32))
    products: dict[int, NarrowWeights] = {}
    for bits in widths:
        dense = _width_linear(linear, quant.dequantize(codes, bits, dtype=dtype))
        if use_int8:
            products[bits] = NarrowWeights(
                dense,
                quant.sliced_int8(codes, bits),
                codes.scales[:, 0].to(dtype),
                always_int8=kernel == "int8",
            )
        else:
            products[bits] = NarrowWeights(dense)
    return products


@dataclass
class Matryoshka(Mechanism):
    name = "matryoshka"
    summary = "per-token weight width 8/4/2 bits from logit-lens entropy (Matryoshka quantisation)"
    choices = {"fixed_bits": (None, *WIDTHS), "kernel": ("auto", "int8", "simulated")}
    knobs = ("entropy_high", "entropy_low")
    savings = frozenset({"weight_bytes"})

    entropy_high: float | None = None
    entropy_low: float | None = None
    decision_layer: int = 15
    lens_vocab: int | None = None
    fixed_bits: int | None = None
    group_size: int | None = None
    kernel: str = "auto"

    def validate(self) -> None:
        check_threshold(self.name, "entropy_high", self.entropy_high)
        check_threshold(self.name, "entropy_low", self.entropy_low)
        adaptive = (self.entropy_high is not None, self.entropy_low is not None)
        if adaptive[0] != adaptive[1]:
            raise PolicyConfigError(
                "matryoshka needs both entropy_high and entropy_low, or neither"
            )
        if all(adaptive) and self.entropy_low > self.entropy_high:
            raise PolicyConfigError(
                f"matryoshka.entropy_low ({self.entropy_low}) must not exceed entropy_high "
                f"({self.entropy_high})"
            )
        if self.fixed_bits is not None and self.fixed_bits not in WIDTHS:
            raise PolicyConfigError(
                f"matryoshka.fixed_bits must be 8, 4 or 2 (or null), got {self.fixed_bits}"
            )
        if self.fixed_bits is not None and all(adaptive):
            raise PolicyConfigError(
                "matryoshka: give either fixed_bits or the two entropy thresholds, not both"
            )
        if self.lens_vocab is not None and self.lens_vocab < 2:
            raise PolicyConfigError(f"matryoshka.lens_vocab must be >= 2, got {self.lens_vocab}")
        if self.group_size is not None and self.group_size < 1:
            raise PolicyConfigError(f"matryoshka.group_size must be >= 1, got {self.group_size}")
        if self.kernel not in ("auto", "int8", "simulated"):
            raise PolicyConfigError(
                f"matryoshka.kernel must be auto, int8 or simulated, got {self.kernel!r}"
            )
        if self.kernel == "int8" and self.group_size is not None:
            raise PolicyConfigError(
                "matryoshka.kernel 'int8' needs one scale per output channel: drop group_size "
                "or use kernel 'auto' / 'simulated'"
            )

    def check_model(self, config: ModelConfig) -> None:
        if self.entropy_high is not None:  # fixed widths never read the decision layer
            check_layer(self.name, "decision_layer", self.decision_layer, config)
        if self.group_size is not None:
            sizes = {config.hidden_size, config.q_dim, config.intermediate_size}
            bad = sorted(s for s in sizes if s % self.group_size)
            if bad:
                raise PolicyConfigError(
                    f"matryoshka.group_size {self.group_size} does not divide this model's "
                    f"input widths {bad}; pick a divisor of {sorted(sizes)}"
                )

    @property
    def is_off(self) -> bool:
        return self.fixed_bits is None and self.entropy_high is None

    @property
    def narrows_weights(self) -> bool:
        return not self.is_off

    def layer_weight_bytes(self, config: ModelConfig, bits: int) -> int:
        return weight_bytes_of_layer(config, bits, self.group_size)

    def prepare_key(self) -> tuple | None:
        widths = (self.fixed_bits,) if self.fixed_bits is not None else WIDTHS
        return (self.group_size, self.kernel, widths)

    def prepare(self, model: Transformer) -> None:
        key = self.prepare_key()
        if getattr(model, "matryoshka_key", None) == key:
            return
        for block in model.blocks:
            for linear in (block.attn.qkv, block.attn.out, block.mlp.up, block.mlp.down):
                linear.narrow = narrow_products(linear, self.group_size, self.kernel, key[2])
        model.matryoshka_key = key

    def release(self, model: Transformer) -> None:
        for linear in model.linears():
            linear.narrow = {}
        model.matryoshka_key = None

    def begin(self, state: TokenState) -> None:
        if self.fixed_bits is not None:
            state.bits[state.active] = self.fixed_bits

    def decides_after(self, layer: int) -> bool:
        return self.entropy_high is not None and layer == self.decision_layer

    def after_layer(self, view: LayerView) -> Decision | None:
        if not self.decides_after(view.layer):
            return None
        entropy = view.lens_entropy(self.lens_vocab)
        bits = torch.full_like(entropy, 4, dtype=torch.long)
        bits[entropy > self.entropy_high] = 8
        bits[entropy < self.entropy_low] = 2
        return Decision(bits=bits)
