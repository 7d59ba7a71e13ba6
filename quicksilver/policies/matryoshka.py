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

Kernels (``kernel``): ``planes`` stores each code as two 4-bit planes for torch's CPU int4
kernel (``quant.pack_planes``). Width 8 is two int4 products (hi + lo planes), width 4 is one
(the hi plane: half the bytes), both from the same stored planes. Width 2 is SIMULATED: no
2-bit kernel exists here, so its top-two-bit values sit in an extra 4-bit plane (extra memory,
4-bit bytes read, 2-bit arithmetic). ``auto`` uses the planes for every linear whose shape,
dtype and device the kernel takes and, for the others, the dense product on weights
dequantised from the code (simulated: the narrow width's arithmetic at the dense speed);
``planes`` refuses to run where the kernel cannot (PolicyConfigError); ``simulated`` uses the
dequantised weights everywhere (the reference path). ``int8`` is a deprecated alias of
``planes``. A linear's path does not depend on how many rows it multiplies, so a token's
numbers are the same in prefill, evaluation and decoding. The counter records the bytes
the planes layout reads at each width (``quant.plane_bytes``: width 2 at 4-bit cost);
``formats.kernel_log`` counts which path ran (``matryoshka-planes{bits}``,
``matryoshka-simulated{bits}``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from quicksilver import quant
from quicksilver.models import formats
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
KERNELS = ("auto", "planes", "simulated")


def _note(kernel: str) -> None:
    if not torch.compiler.is_compiling():
        formats.kernel_log[kernel] += 1


def _width_linear(linear: torch.nn.Module, weight: torch.Tensor) -> Linear:
    """A Linear holding a dequantised weight, on the same fast path as the model's own (a
    quantised base layer has no dense fast path of its own: its copy is pre-packed)."""
    narrow = Linear(linear.in_features, linear.out_features, linear.bias is not None)
    narrow.weight.data = weight
    if linear.bias is not None:
        narrow.bias.data = linear.bias.detach()
    if not isinstance(linear, Linear) or linear.packed is not None:
        narrow.pack()
    return narrow


@dataclass
class PlaneProduct:
    """One linear layer at one width through the int4 bit planes (shared between widths)."""

    planes: quant.BitPlanes
    bits: int
    bias: torch.Tensor | None = None

    simulated = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _note(f"matryoshka-planes{self.bits}")
        dtype = self.planes.dtype
        y = quant.planes_linear(x.to(dtype), self.planes, self.bits, self.bias)
        return y.to(x.dtype)

    @property
    def storage_bytes(self) -> int:
        return self.planes.storage_bytes


@dataclass
class DequantisedProduct:
    """One linear layer at one width as a dense product on dequantised weights: the narrow
    width's arithmetic at the dense speed (simulated). ``reason`` says why the planes were
    not used."""

    dense: Linear
    bits: int
    reason: str

    simulated = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _note(f"matryoshka-simulated{self.bits}")
        return self.dense(x)

    @property
    def storage_bytes(self) -> int:
        return self.dense.storage_bytes


def narrow_products(
    linear: torch.nn.Module, group_size: int | None, kernel: str, widths: tuple[int, ...]
) -> dict[int, PlaneProduct | DequantisedProduct]:
    """bits -> ``linear`` at that width, from one shared code (its planes where the kernel
    runs). ``linear`` may be any weight format: its weight is read through ``dense_weight``."""
    weight = linear.dense_weight().detach()
    dtype = weight.dtype
    codes = quant.quantize(weight, group_size)
    if kernel == "simulated":
        why = "kernel 'simulated' chosen"
    elif not formats.int4_kernel_available():
        why = "this torch build has no working CPU int4 kernel"
    else:
        why = quant.planes_unsupported(
            linear.out_features, linear.in_features, codes.group_size, dtype, weight.device
        )
    if why is not None and kernel == "planes":
        raise PolicyConfigError(
            f"matryoshka.kernel 'planes' cannot run on this layer ({why}); use kernel 'auto' "
            "(planes where they fit, dequantised weights elsewhere) or 'simulated'"
        )
    bias = None if linear.bias is None else linear.bias.detach()
    if why is None:
        planes = quant.pack_planes(codes, quant.planes_for(widths), dtype)
        return {bits: PlaneProduct(planes, bits, bias) for bits in widths}
    return {
        bits: DequantisedProduct(
            _width_linear(linear, quant.dequantize(codes, bits, dtype=dtype)), bits, why
        )
        for bits in widths
    }


def prepared_bytes(model: Transformer) -> int:
    """Bytes the Matryoshka products attached to ``model`` hold (shared planes counted once),
    on top of the model's own weights."""
    seen: set[int] = set()
    total = 0
    for linear in model.linears():
        for product in linear.narrow.values():
            owner = product.planes if isinstance(product, PlaneProduct) else product.dense
            if id(owner) not in seen:
                seen.add(id(owner))
                total += product.storage_bytes
    return total


def layer_bytes(config: ModelConfig, bits: int, group_size: int | None, scale_bytes: int) -> int:
    """Bytes one block's four linears read at ``bits`` from the planes layout."""
    d, q, kv, inner = config.hidden_size, config.q_dim, config.kv_dim, config.intermediate_size
    up = inner * (2 if config.gated_mlp else 1)
    shapes = [(q + 2 * kv, d), (d, q), (up, d), (d, inner)]
    return sum(
        quant.plane_bytes(out, inp, bits, quant.plane_groups(inp, group_size), scale_bytes)
        for out, inp in shapes
    )


@dataclass
class Matryoshka(Mechanism):
    name = "matryoshka"
    summary = (
        "per-token weight width 8/4/2 bits from logit-lens entropy (Matryoshka quantisation; "
        "8 and 4 bits as int4 bit planes, 2 bits simulated on a 4-bit plane)"
    )
    choices = {"fixed_bits": (None, *WIDTHS), "kernel": KERNELS}
    knobs = ("entropy_high", "entropy_low")
    savings = frozenset({"weight_bytes"})

    entropy_high: float | None = None
    entropy_low: float | None = None
    decision_layer: int = 15
    lens_vocab: int | None = None
    fixed_bits: int | None = None
    group_size: int | None = None
    kernel: str = "auto"

    # Bytes of each (scale, zero) value the kernel reads: the model's dtype, set by prepare.
    _scale_bytes: ClassVar[int] = 4

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
        if self.kernel == "int8":
            warnings.warn(
                "matryoshka.kernel 'int8' is deprecated: it now means 'planes' (int4 bit planes)",
                DeprecationWarning,
                stacklevel=2,
            )
            self.kernel = "planes"
        if self.kernel not in KERNELS:
            raise PolicyConfigError(
                f"matryoshka.kernel must be auto, planes or simulated, got {self.kernel!r}"
            )
        if (
            self.kernel == "planes"
            and self.group_size is not None
            and quant.kernel_group(self.group_size, self.group_size) is None
        ):
            raise PolicyConfigError(
                f"matryoshka.kernel 'planes' needs a group_size that is a multiple of 32 (the "
                f"int4 kernel's groups are {quant.PLANE_KERNEL_GROUPS[::-1]}), got "
                f"{self.group_size}; use kernel 'auto' or 'simulated'"
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
        """What the planes layout reads at ``bits`` (width 2: a 4-bit plane, simulated), with
        (scale, zero) pairs in the activation dtype seen by ``prepare`` (float32 before)."""
        return layer_bytes(config, bits, self.group_size, self._scale_bytes)

    def prepare_key(self) -> tuple | None:
        widths = (self.fixed_bits,) if self.fixed_bits is not None else WIDTHS
        return (self.group_size, self.kernel, widths)

    def prepare(self, model: Transformer) -> None:
        key = self.prepare_key()
        self._scale_bytes = model.dtype.itemsize
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
