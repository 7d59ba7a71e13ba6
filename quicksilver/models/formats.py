"""Weight formats: how a linear layer's weights are stored and which kernel multiplies them.

Every format is a module behind the same interface as ``transformer.Linear`` (``forward``,
``partial`` for a band of output rows, ``dense_weight``, ``storage_bytes``), so the model,
the runner and the policies never ask which one they hold. One copy of the weights is kept,
in the chosen format:

- ``int8``: symmetric per-output-channel codes.
- ``int4``: 16-level codes in groups of 32, 64 or 128 inputs with a scale and a zero per group,
  ``w = (q - 8) * scale + zero``. GGUF's Q4_0 and Q4_1 blocks, and Q4_K's sub-blocks, are
  exactly this form (``gguf_file.int4_codes_from_gguf``), so they load without re-quantising.

By default torch's weight-only kernels multiply them (``aten._weight_int8pack_mm``,
``aten._weight_int4pack_mm_for_cpu``). With ``QUICKSILVER_KERNELS=ours`` (or ``kernel="ours"``)
our kernels do (``quicksilver.kernels``), where they run (x86-64 with AVX-512 VNNI or AVX2, N
a multiple of 16, K of 32): each row's activations are rounded to int8 per block of 32 inputs,
as llama.cpp does, and multiplied with integer dot products, so a product's cost grows slowly
with rows and a row's output does not depend on the rest of the call; int4 scales and zeros
are then kept in float16, as GGUF keeps them. The two are different numerics, each measured
(docs/results/int-kernels/formats.md); ``rounds_activations`` tells the engine to attend
exactly then (``quicksilver.kernels`` says why).

Past ``dequant_rows`` rows (long prefills, evaluation) the weight is expanded once into the
activation dtype and multiplied densely: torch's kernels re-read their weights every four
rows (its int8 kernel matched expand-then-multiply at 64 rows on SmolLM2's 3072x576
up-projection, bf16; expanding int4 costs ~7 ms a matrix, which pays from about 1,024 rows).
torch's float32 paths are scalar loops (40-120x slower than in bf16), so there they run only
up to ``FLOAT32_KERNEL_ROWS`` rows; ours are as fast in float32. Shapes no kernel takes, and
bands of outputs off a kernel's tiles, use the dense product on the dequantised weight.
``kernel_log`` counts which path ran (``int4-q8``, ``int4``, ``int4-dequant``...), so results
can say so.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from quicksilver import kernels, quant
from quicksilver.errors import QuicksilverError
from quicksilver.quant import Int4Codes, quantize_int4

WEIGHT_FORMATS = ("float32", "bfloat16", "float16", "int8", "int4")
"""What ``qs.load(..., weights=)`` accepts: a float dtype keeps the model's dense weights."""
INT4_GROUPS = (32, 64, 128)
FLOAT32_KERNEL_ROWS = 4
# Our kernels multiply up to this many rows; past it, expanding the weight into bf16 and one
# dense product is faster (3072x576, 2 AVX-512 cores: ours 7.0 ms at 1,024 rows against 8.7,
# 30 ms at 4,096 against 20).
NATIVE_ROWS = 2048
# The CPU int4 kernel blocks output rows by 64: a band of rows can be multiplied on its own
# when it starts on a block boundary.
_INT4_BLOCK_N = 64

kernel_log: collections.Counter[str] = collections.Counter()
"""How many products each kernel ran (e.g. ``int4``, ``int4-dequant``), since the last clear."""


def _note(kernel: str) -> None:
    if not torch.compiler.is_compiling():
        kernel_log[kernel] += 1


@functools.cache
def int4_kernel_available() -> bool:
    """Whether torch's CPU int4 kernel runs and is right here."""
    pack = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    if pack is None or op is None:
        return False
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (16, 32), dtype=torch.int32, generator=gen)
    scales = torch.rand(1, 16, generator=gen) + 0.5
    zeros = torch.randn(1, 16, generator=gen)
    x = torch.randn(2, 32, generator=gen)
    try:
        y = op(x, pack(codes, 1), 32, torch.stack([scales, zeros], -1))
    except (RuntimeError, NotImplementedError):
        return False
    ref = x @ ((codes.float() - 8) * scales.T + zeros.T).T
    return bool(torch.allclose(y, ref, rtol=1e-4, atol=1e-4))


def int4_kernel_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Shapes the CPU int4 kernel accepts."""
    return (
        out_features % 16 == 0
        and group_size in (32, 64, 128, 256)
        and in_features % group_size == 0
        and in_features % 2 == 0
    )


# ---------------------------------------------------------------- modules


class QuantLinear(nn.Module):
    """What the int8 and int4 formats share: shape, bias, the dtype products come out in,
    and the fallback of expanding the weight for many rows."""

    kernel_name = ""
    dequant_rows = 64  # above this many rows, expand the weight and multiply densely

    def __init__(
        self, in_features: int, out_features: int, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), False)
        self.dtype = dtype
        self.narrow: dict = {}  # the Matryoshka policy's products, as on ``Linear``

    def dense_weight(self, rows: slice = slice(None)) -> torch.Tensor:
        raise NotImplementedError

    def kernel_product(self, x: torch.Tensor, rows: slice) -> torch.Tensor | None:
        """The weight-only kernel's product of x [M, in] with output rows ``rows``, or None
        where the kernel cannot take this call."""
        raise NotImplementedError

    @property
    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers()) + (
            0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        )

    def partial(self, x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        """The product for output rows ``start:stop`` only."""
        stop = self.out_features if stop is None else stop
        rows = slice(start, stop)
        flat = x.reshape(-1, self.in_features).to(self.dtype)
        y = None
        if flat.shape[0] <= self.kernel_rows:
            y = self.kernel_product(flat, rows)
        if y is None:
            _note(f"{self.kernel_name}-dequant")
            y = F.linear(flat, self.dense_weight(rows))
        else:
            _note(self.kernel_name)
        if self.bias is not None:
            y = y + self.bias[rows]
        return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    def runs_ours(self, kernel: str) -> bool:
        """Whether our kernels take this weight: asked for (``kernel="ours"``, or ``auto``
        with ``QUICKSILVER_KERNELS=ours``), whole tiles of outputs and blocks of inputs, and
        built here."""
        asked = kernel == "ours" or (kernel == "auto" and kernels.wanted())
        return (
            asked
            and self.out_features % kernels.TILE == 0
            and self.in_features % kernels.BLOCK == 0
            and kernels.available()
        )

    def set_kernel_rows(self, native: bool) -> None:
        """The most rows the weight-only kernel takes (a plain attribute: the compiled step
        reads it). Ours is as fast in float32 as in bf16; torch's float32 kernels are scalar
        loops (40-120x slower than their bf16 paths here), so they only pay for a handful of
        rows."""
        float32 = self.dtype == torch.float32
        self.kernel_rows = FLOAT32_KERNEL_ROWS if float32 and not native else self.dequant_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.partial(x, 0, None)


class Int8Linear(QuantLinear):
    """Per-output-channel int8 codes and scales. Multiplied by our kernel where it runs
    (``quicksilver.kernels``: activations rounded to int8 per block of 32, ``int8-q8`` in
    ``kernel_log``), else by torch's int8 weight-only kernel (``int8``), else densely."""

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        kernel: str = "auto",
    ) -> None:
        """``kernel``: ``ours`` (where it runs), ``torch``, or ``auto``: ours where
        ``QUICKSILVER_KERNELS=ours`` asks for it (both formats), else torch's."""
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias, dtype)
        on_cpu = codes.device.type == "cpu"
        self.native = on_cpu and self.runs_ours(kernel)
        self.use_kernel = self.native or (
            on_cpu
            and quant.int8_kernel_available()
            and quant.int8_kernel_supports(dtype, in_features)
        )
        self.kernel_name = "int8-q8" if self.native else "int8"
        self.dequant_rows = NATIVE_ROWS if self.native else 64  # torch's re-reads its weight
        self.set_kernel_rows(self.native)
        codes = codes.to(torch.int8)
        if self.native:  # float32 scales: applied once per output, after the integer sums
            self.register_buffer("packed", kernels.pack8(codes))
            self.register_buffer("codes", None)
            self.register_buffer("scales", scales.reshape(out_features).float().contiguous())
        else:
            self.register_buffer("packed", None)
            self.register_buffer("codes", codes.contiguous())
            self.register_buffer("scales", scales.reshape(out_features).to(dtype).contiguous())

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, kernel="auto"
    ) -> Int8Linear:
        """Per-channel codes, computed a band of rows at a time: a large matrix (an LM head)
        then needs little memory beyond its codes."""
        codes, scales = [], []
        for rows in weight.split(4096):
            band = quant.quantize(rows)
            codes.append(quant.sliced_int8(band, 8))
            scales.append(band.scales[:, 0])
        return cls(torch.cat(codes), torch.cat(scales), bias, dtype, kernel)

    def dense_weight(self, rows: slice = slice(None)) -> torch.Tensor:
        codes = kernels.unpack8(self.packed)[rows] if self.native else self.codes[rows]
        return (codes.to(self.scales.dtype) * self.scales[rows].unsqueeze(1)).to(self.dtype)

    def kernel_product(self, x: torch.Tensor, rows: slice) -> torch.Tensor | None:
        if not self.use_kernel:
            return None
        if not self.native:
            return quant.int8_linear(x, self.codes[rows], self.scales[rows])
        tiles = kernels.tiles_of(rows)
        return None if tiles is None else kernels.linear8(x, self.packed, self.scales, tiles)


class Int4Linear(QuantLinear):
    """Groups of 4-bit codes with a scale and zero each. Multiplied by our kernel where it
    runs (``quicksilver.kernels``: activations rounded to int8 per block of 32, cost nearly
    flat in rows, ``int4-q8`` in ``kernel_log``), else by torch's CPU int4 kernel (``int4``),
    else densely from the expanded weight."""

    def __init__(
        self,
        codes: Int4Codes,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        kernel: str = "auto",
    ) -> None:
        """``kernel``: ``ours`` (where it runs), ``torch``, or ``auto``: ours where
        ``QUICKSILVER_KERNELS=ours`` asks for it, else torch's."""
        out_features, in_features = codes.codes.shape
        super().__init__(in_features, out_features, bias, dtype)
        self.group_size = codes.group_size
        on_cpu = codes.codes.device.type == "cpu"
        self.native = on_cpu and codes.group_size % kernels.BLOCK == 0 and self.runs_ours(kernel)
        self.use_kernel = self.native or (
            on_cpu
            and int4_kernel_available()
            and int4_kernel_fits(out_features, in_features, codes.group_size)
        )
        self.kernel_name = "int4-q8" if self.native else "int4"
        self.dequant_rows = NATIVE_ROWS if self.native else 1024
        self.set_kernel_rows(self.native)
        for name in ("packed", "codes", "scales_zeros"):
            self.register_buffer(name, None)
        if self.native:
            mins = codes.zeros - 8 * codes.scales
            self.packed = kernels.pack(codes.codes, codes.scales, mins, codes.group_size)
            return
        # [in / g, out, 2]: torch's layout of scales and zeros, in the activation dtype.
        sz = torch.stack([codes.scales, codes.zeros], -1).transpose(0, 1)
        self.scales_zeros = sz.to(dtype).contiguous()
        if self.use_kernel:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.codes.int(), 1)
        else:  # kept unpacked, two codes a byte, for the dense fallback
            pairs = codes.codes.view(out_features, -1, 2)
            self.codes = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        group_size: int,
        kernel: str = "auto",
    ) -> Int4Linear:
        return cls(quantize_int4(weight, group_size), bias, dtype, kernel)

    def unpacked_codes(self, rows: slice = slice(None)) -> torch.Tensor:
        """uint8 codes 0..15 [out, in] of the given output rows."""
        if self.native:
            return kernels.unpack(self.packed)[0][rows]
        if self.packed is None:
            pairs = self.codes[rows]
            return torch.stack([pairs & 15, pairs >> 4], -1).view(pairs.shape[0], -1)
        # torch's layout is its own (and differs between CPUs), so the codes are read back
        # through its kernel: an identity input with scale 1 and zero 8 gives q, exactly
        # even in bf16 (0..15, one nonzero term per output), and bf16 runs the fast path.
        groups = self.in_features // self.group_size
        unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).expand(groups, self.out_features, 2)
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        codes = torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.packed, self.group_size, unit.contiguous()
        )
        return codes.T[rows].to(torch.uint8)

    def dense_weight(self, rows: slice = slice(None)) -> torch.Tensor:
        if self.native:
            return kernels.dequantize(self.packed)[rows].to(self.dtype)
        sz = self.scales_zeros[:, rows].float()
        codes = Int4Codes(self.unpacked_codes(rows), sz[..., 0].T, sz[..., 1].T, self.group_size)
        return codes.dequantize(self.dtype)

    def kernel_product(self, x: torch.Tensor, rows: slice) -> torch.Tensor | None:
        if not self.use_kernel:
            return None
        start, stop = rows.start, rows.stop
        if self.native:
            tiles = kernels.tiles_of(rows)
            return None if tiles is None else kernels.linear(x, self.packed, tiles)
        whole = start == 0 and stop == self.out_features
        if not whole and (start % _INT4_BLOCK_N or (stop - start) % 16):
            return None
        packed, sz = self.packed, self.scales_zeros
        if not whole:
            packed, sz = packed[start:stop], sz[:, start:stop].contiguous()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, self.group_size, sz)


def rounds_activations(model: nn.Module) -> bool:
    """Whether any of the model's products runs our kernels, which round activations to int8
    (then attention must compute every query exactly as a one-token step does)."""
    return any(getattr(module, "native", False) for module in model.modules())


# ---------------------------------------------------------------- converting a model


@dataclass(frozen=True)
class WeightFormat:
    """A load's choice: the blocks' format, the LM head's (None: same as the blocks', except
    that an int4 head becomes int8: one 4-bit head broke greedy output in our measurements),
    and the int4 group size."""

    blocks: str = "bfloat16"
    head: str | None = None
    group_size: int = 32

    def __post_init__(self) -> None:
        for name in (self.blocks, self.head):
            if name is not None and name not in WEIGHT_FORMATS:
                raise QuicksilverError(
                    f"unknown weight format {name!r}; choose one of {', '.join(WEIGHT_FORMATS)}"
                )
        if self.group_size not in INT4_GROUPS:
            raise QuicksilverError(
                f"int4 group size must be one of {INT4_GROUPS}, got {self.group_size}"
            )

    def describe(self) -> str:
        """E.g. ``int4 (groups of 32), head int8`` or ``bfloat16``."""
        text = self.blocks + (f" (groups of {self.group_size})" if self.blocks == "int4" else "")
        return text if self.head_format == self.blocks else f"{text}, head {self.head_format}"

    def to_dict(self) -> dict[str, object]:
        return {"blocks": self.blocks, "head": self.head_format, "group_size": self.group_size}

    @property
    def quantised(self) -> bool:
        return self.blocks in ("int8", "int4") or self.head_format in ("int8", "int4")

    @property
    def head_format(self) -> str:
        if self.head is not None:
            return self.head
        return "int8" if self.blocks == "int4" else self.blocks


@dataclass
class RoundingReport:
    """How far re-quantising moved weights from the values they were made from (a GGUF
    file's own, already rounded once): the squared error and squared norm summed per layer,
    so a load can print one measured figure instead of a guess. Scales are rounded to the
    activation dtype first, as the kernels hold them."""

    squared_error: dict[str, float] = field(default_factory=dict)
    squared_norm: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, before: torch.Tensor, after: torch.Tensor) -> None:
        before = before.float()
        self.squared_error[name] = float((after.float() - before).square().sum())
        self.squared_norm[name] = float(before.square().sum())

    def relative_error(self, names: list[str] | None = None) -> float:
        """Root of summed squared error over summed squared norm (all layers, or ``names``)."""
        names = list(self.squared_error) if names is None else names
        norm = sum(self.squared_norm[n] for n in names)
        return (sum(self.squared_error[n] for n in names) / norm) ** 0.5 if norm else 0.0


def convert_linear(
    linear: nn.Module,
    kind: str,
    dtype: torch.dtype,
    group_size: int,
    report: RoundingReport | None = None,
    name: str = "",
) -> nn.Module:
    """``linear`` in format ``kind`` (a float format keeps it as it is); ``report`` records
    the rounding error under ``name``."""
    if kind not in ("int8", "int4"):
        return linear
    weight = linear.dense_weight()
    bias = linear.bias
    if kind == "int8":
        new = Int8Linear.from_weight(weight, bias, dtype)
        if report is not None:
            report.add(name, weight, new.dense_weight())
        return new
    codes = quantize_int4(weight, int4_group(linear.in_features, group_size))
    if report is not None:
        held = Int4Codes(
            codes.codes,
            codes.scales.to(dtype).float(),
            codes.zeros.to(dtype).float(),
            codes.group_size,
        )
        report.add(name, weight, held.dequantize())
    return Int4Linear(codes, bias, dtype)


def int4_group(in_features: int, group_size: int) -> int:
    """The group size used for a matrix of this width: ``group_size`` if it divides the
    width, else the largest smaller kernel group that does, else one group per row (which
    the kernel refuses: that matrix then runs on the dense fallback)."""
    for group in INT4_GROUPS[::-1]:
        if group <= group_size and in_features % group == 0:
            return group
    return in_features


def convert_block(
    model: nn.Module,
    index: int,
    fmt: WeightFormat,
    codes: Mapping[str, Int4Codes] | None = None,
    report: RoundingReport | None = None,
) -> None:
    """Replace block ``index``'s linear layers by their ``fmt.blocks`` form, in place.

    ``codes`` gives ready int4 codes for some layers (by module name, e.g. from GGUF Q4
    blocks); those are used as they are instead of re-quantising. ``report`` records the
    rounding error of the layers that are re-quantised."""
    dtype = model.dtype
    codes = codes or {}
    block = model.blocks[index]
    for owner, part, attr in (
        (block.attn, "attn", "qkv"),
        (block.attn, "attn", "out"),
        (block.mlp, "mlp", "up"),
        (block.mlp, "mlp", "down"),
    ):
        name = f"blocks.{index}.{part}.{attr}"
        linear = getattr(owner, attr)
        if fmt.blocks == "int4" and name in codes:
            new = Int4Linear(codes[name], linear.bias, dtype)
        else:
            new = convert_linear(linear, fmt.blocks, dtype, fmt.group_size, report, name)
        setattr(owner, attr, new)


def convert_head(model: nn.Module, fmt: WeightFormat, report: RoundingReport | None = None) -> None:
    """The LM head in ``fmt.head_format`` (a tied head gets its own copy in that format; the
    embedding stays in the model's dtype for lookups). Records ``fmt`` on the model."""
    model.lm_head = convert_linear(
        model.lm_head, fmt.head_format, model.dtype, fmt.group_size, report, "lm_head"
    )
    model.weight_format = fmt


def convert_model(
    model: nn.Module, fmt: WeightFormat, codes: Mapping[str, Int4Codes] | None = None
) -> None:
    """Every block's linear layers and the LM head in their ``fmt`` form, in place.
    Embeddings, norms and OPT's input/output projections keep the model's dtype."""
    for index in range(len(model.blocks)):
        convert_block(model, index, fmt, codes)
    convert_head(model, fmt)
