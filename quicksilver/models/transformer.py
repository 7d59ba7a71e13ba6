"""A layer-by-layer decoder-only transformer in plain PyTorch (Llama, GPT-2, OPT).

The model holds weights and per-layer functions only: projections, norms, the MLP, the block
around a token-mixing function. The loop over layers, the KV cache and attention live in
``quicksilver.runtime`` so that the runner can decide, per layer, which tokens run and what
they read. Every block works on whatever tokens it is handed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quicksilver import kernels
from quicksilver.errors import QuicksilverError
from quicksilver.models.config import ModelConfig
from quicksilver.models.formats import QuantLinear, WeightFormat


@functools.cache
def onednn_linear_works(dtype: torch.dtype) -> bool:
    """Whether this torch build can run oneDNN's pre-packed linear for ``dtype`` (tried once)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ones(4, 8, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        probe = torch.ones(1, 8, dtype=dtype)
        out = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return bool((out == 8).all())


# Rows up to which a bf16 product runs our kernel (``kernels.linear_bf16``) in eager forwards:
# decode steps and verify forwards; a prefill's many rows run oneDNN's matrix product.
OURS_BF16_ROWS = 16


class Linear(nn.Module):
    """``y = x W^T + b`` with an optional oneDNN pre-packed weight for the CPU fast path.

    Pre-packing the weight into oneDNN's blocked layout roughly halves the time of the small
    matrix-vector products that dominate decoding on CPU. The packed copy is numerically the
    same product; ``pack`` silently keeps the plain path where oneDNN is unavailable. With
    ``QUICKSILVER_KERNELS=ours`` a bf16 weight is also packed for our kernel, which streams a
    one-row product at the machine's bandwidth where oneDNN's reached ~70% of it (a third copy
    of the weight, opt-in as our other kernels are).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None
        self.packed_ours: torch.Tensor | None = None  # kernels.pack_bf16's layout
        # Products at a reduced weight width (bits -> callable(x)), attached by the
        # Matryoshka policy; the full-precision weight above stays the reference.
        self.narrow: dict[int, Callable[..., torch.Tensor]] = {}

    def pack(self) -> None:
        self.packed = self.packed_ours = None
        if self.weight.device.type != "cpu" or not onednn_linear_works(self.weight.dtype):
            return
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        out_features, in_features = self.weight.shape
        if (
            self.weight.dtype == torch.bfloat16
            and out_features % kernels.TILE == 0
            and in_features % kernels.BLOCK == 0
            and kernels.wanted()
            and kernels.bf16_available()
        ):
            self.packed_ours = kernels.pack_bf16(self.weight.detach())

    def unpack(self) -> None:
        self.packed = self.packed_ours = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_ours is not None and x.dtype == torch.bfloat16:
            flat = x.reshape(-1, self.in_features)
            # Compiled graphs always take it: a branch on their dynamic row count would be
            # one more graph to trace.
            if torch.compiler.is_compiling() or flat.shape[0] <= OURS_BF16_ROWS:
                y = kernels.linear_bf16(flat.contiguous(), self.packed_ours)
                if self.bias is not None:
                    y = y + self.bias
                return y.view(*x.shape[:-1], self.out_features)
        if (
            self.packed is not None
            and x.dtype == self.weight.dtype
            and not torch.compiler.is_compiling()  # a compiled graph packs its own weights
        ):
            flat = x.reshape(-1, self.in_features)
            y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def partial(self, x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        """The product for output rows ``start:stop`` only (e.g. K/V without Q, or the
        first rows of an LM head): the other rows' work is not done."""
        rows = slice(start, stop)
        bias = self.bias[rows] if self.bias is not None else None
        return F.linear(x, self.weight[rows], bias)

    def dense_weight(self, rows: slice = slice(None)) -> torch.Tensor:
        """The weight as a dense [out, in] tensor in the model's dtype."""
        return self.weight[rows]

    @property
    def storage_bytes(self) -> int:
        """Bytes of weights (and bias) a full product reads."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.weight.numel() * self.weight.element_size() + bias


@dataclass
class WidthGroups:
    """Rows of a flattened token block that run their matmuls at each weight width
    (0 = the model's own precision; 8/4/2 = Matryoshka integer widths)."""

    groups: list[tuple[torch.Tensor, int]]  # (row indices, bits)


def run_linear(linear: Linear, x: torch.Tensor, widths: WidthGroups | None) -> torch.Tensor:
    """``linear(x)``, each row group at its own weight width."""
    if widths is None:
        return linear(x)

    def product(rows: torch.Tensor, bits: int) -> torch.Tensor:
        return linear(rows) if bits == 0 else linear.narrow[bits](rows)

    if len(widths.groups) == 1:
        return product(x, widths.groups[0][1])
    flat = x.reshape(-1, x.shape[-1])
    out = flat.new_empty(flat.shape[0], linear.out_features)
    for rows, bits in widths.groups:
        out[rows] = product(flat[rows], bits)
    return out.view(*x.shape[:-1], linear.out_features)


class Norm(nn.Module):
    """RMSNorm (Llama) or LayerNorm (GPT-2, OPT), computed the way the reference models do."""

    def __init__(self, dim: int, kind: str, eps: float) -> None:
        super().__init__()
        self.kind = kind
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False) if kind == "layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies, including linear and Llama-3 style scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if config.rope_freq_factors:  # Llama-3.1 GGUF files store the scaled frequencies' divisors
        factors = torch.tensor(config.rope_freq_factors, dtype=torch.float32)
        if factors.shape != inv_freq.shape:
            raise QuicksilverError(
                f"rope frequency factors have {factors.numel()} entries, expected "
                f"{inv_freq.numel()} (head_dim / 2)"
            )
        return inv_freq / factors
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are slowed down by `factor`, short ones kept, the band between
    # the two cut-offs interpolated smoothly.
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    wavelength = 2 * math.pi / inv_freq
    slowed = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    blend = (original / wavelength - low) / (high - low)
    smoothed = (1 - blend) * slowed / factor + blend * slowed
    in_band = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(in_band, smoothed, slowed)


def rope_tables(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for each token's position: [B, S, 1, head_dim].

    The sine's first half is negated once here, so every layer rotates with a single ``roll``
    instead of slicing, negating and concatenating (the products are bitwise the same).
    """
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    sin = angles.sin()
    cos = angles.cos()
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(2).to(dtype)
    signed_sin = torch.cat((-sin, sin), dim=-1).unsqueeze(2).to(dtype)
    return cos, signed_sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, S, heads, head_dim] in the half-split layout transformers uses:
    ``x * cos + (-x2, x1) * sin``, written as ``x * cos + (x2, x1) * (-sin, sin)``."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.q_dim = config.q_dim
        self.kv_dim = config.kv_dim
        self.qkv = Linear(config.hidden_size, config.q_dim + 2 * config.kv_dim, config.qkv_bias)
        self.out = Linear(config.q_dim, config.hidden_size, config.out_bias)

    def project(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        widths: WidthGroups | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values [B, S, heads, head_dim] of x [B, S, d], RoPE applied."""
        batch, seq, _ = x.shape
        qkv = run_linear(self.qkv, x, widths)
        qk = qkv[..., : self.q_dim + self.kv_dim].view(batch, seq, -1, self.head_dim)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # queries and keys rotated in one pass
        q, k = qk.split((self.n_heads, self.n_kv_heads), dim=2)
        v = qkv[..., self.q_dim + self.kv_dim :].view(batch, seq, self.n_kv_heads, self.head_dim)
        return q, k, v

    def project_kv(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values only (the rows of the fused weight after the queries): what a
        token that no longer runs the layer still costs to stay visible to later tokens."""
        batch, seq, _ = x.shape
        kv = self.qkv.partial(x, self.q_dim).view(batch, seq, -1, self.head_dim)
        k, v = kv.split((self.n_kv_heads, self.n_kv_heads), dim=2)
        if rope is not None:
            k = apply_rope(k, *rope)
        return k, v


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gated = config.gated_mlp
        self.activation = config.activation
        width = config.intermediate_size * (2 if self.gated else 1)
        self.up = Linear(config.hidden_size, width, config.mlp_bias)
        self.down = Linear(config.intermediate_size, config.hidden_size, config.mlp_bias)

    def forward(self, x: torch.Tensor, widths: WidthGroups | None = None) -> torch.Tensor:
        h = run_linear(self.up, x, widths)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return run_linear(self.down, F.silu(gate) * up, widths)
        if self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.activation == "gelu":
            h = F.gelu(h)
        elif self.activation == "relu":
            h = F.relu(h)
        else:
            raise ValueError(f"activation {self.activation!r} has no implementation")
        return run_linear(self.down, h, widths)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = config.pre_norm
        self.attn_norm = Norm(config.hidden_size, config.norm, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = Norm(config.hidden_size, config.norm, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        h: torch.Tensor,
        attention: Callable[[torch.Tensor], torch.Tensor],
        widths: WidthGroups | None = None,
    ) -> torch.Tensor:
        """The block around a given token-mixing function (norms, residuals, MLP): the
        runner supplies attention, since which cache entries a token reads is its business."""
        if self.pre_norm:
            h = h + attention(self.attn_norm(h))
            return h + self.mlp(self.mlp_norm(h), widths)
        h = self.attn_norm(h + attention(h))
        return self.mlp_norm(h + self.mlp(h, widths))

    def attention_input(self, h: torch.Tensor) -> torch.Tensor:
        """What the attention projections read from the residual stream h."""
        return self.attn_norm(h) if self.pre_norm else h


class Transformer(nn.Module):
    """Weights and per-stage functions; ``runtime.engine`` drives them."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Parameter(
            torch.empty(config.vocab_size, config.embed_dim), requires_grad=False
        )
        self.position_embed = (
            nn.Parameter(
                torch.empty(
                    config.max_position_embeddings + config.position_offset, config.hidden_size
                ),
                requires_grad=False,
            )
            if config.position == "learned"
            else None
        )
        proj = config.word_embed_proj_dim
        self.project_in = Linear(proj, config.hidden_size, False) if proj else None
        self.project_out = Linear(config.hidden_size, proj, False) if proj else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = (
            Norm(config.hidden_size, config.norm, config.norm_eps) if config.final_norm else None
        )
        self.lm_head = Linear(config.embed_dim, config.vocab_size, False)
        # Fitted per-layer maps the logit lens reads through (``quicksilver.adapt.exits``).
        self.exit_heads: Callable[[torch.Tensor, int], torch.Tensor] | None = None
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def weight_format(self) -> WeightFormat:
        """How the linear weights are stored (set by ``formats.convert_model``)."""
        fmt = getattr(self, "_weight_format", None)
        return fmt or WeightFormat(blocks=str(self.dtype).removeprefix("torch."))

    @weight_format.setter
    def weight_format(self, fmt: WeightFormat) -> None:
        self._weight_format = fmt

    def linears(self) -> list[Linear | QuantLinear]:
        return [m for m in self.modules() if isinstance(m, (Linear, QuantLinear))]

    def layer_weight_bytes(self) -> int:
        """Bytes of linear weights one block reads for a full pass, in their stored format."""
        block = self.blocks[0]
        parts = (block.attn.qkv, block.attn.out, block.mlp.up, block.mlp.down)
        return sum(linear.storage_bytes for linear in parts)

    def set_fast_path(self, enabled: bool) -> None:
        """Pre-pack every float weight for oneDNN (enabled) or use plain ``F.linear``."""
        for linear in self.linears():
            if isinstance(linear, Linear):
                linear.pack() if enabled else linear.unpack()

    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = F.embedding(tokens, self.embed)
        if self.project_in is not None:
            h = self.project_in(h)
        if self.position_embed is not None:
            h = h + F.embedding(positions + self.config.position_offset, self.position_embed)
        return h

    def rope_for(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config.position != "rope":
            return None
        return rope_tables(self.inv_freq, positions, self.dtype)

    def final_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The state the LM head reads: final norm (and OPT's output projection) applied."""
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_hidden(h))

    def lens_state(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """What the logit lens reads of layer ``layer``'s states: mapped by the layer's
        exit head when the model has fitted ones (a tuned lens), else the states as they are."""
        return h if self.exit_heads is None else self.exit_heads(h, layer)
