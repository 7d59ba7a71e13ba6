"""Matryoshka weight quantisation: one int8 code per weight, nested int4 and int2 inside it.

Each weight is stored once, as an offset-binary byte u = q + 128 (q the symmetric int8 code).
The top 4 bits of u are its int4 code and the top 2 bits its int2 code, so one copy of the
weights serves three widths: a layer can be run at 8, 4 or 2 bits per weight without
re-quantising. A narrower slice is read back at the centre of its bucket, so dropping the low
bits adds no systematic bias.

Bit planes make the narrow widths real on CPU: the byte is split into two 4-bit planes,
hi = u >> 4 and lo = u & 15, each packed for torch's CPU int4 kernel, which computes
x @ ((p - 8) * scale + zero)^T per group of inputs. With s the weight's scale,

    s (u - 128) = 16 s (hi - 8) + 8 s  +  s (lo - 8)

so width 8 is the hi-plane product (scale 16 s, zero 8 s) plus the lo-plane product (scale s,
zero 0), and width 4 (the top nibble at its bucket centre, ``dequantize(codes, 4)``) is the
hi-plane product alone: half the bytes read. No 2-bit kernel exists here, so width 2 is an
extra int4 plane holding the top two bits (p = (u >> 6) + 6, scale 64 s, zero 32 s): the
arithmetic of 2 bits at the cost of 4 (simulated; extra memory).

Everything here is a pure tensor function; nothing touches a model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

SLICE_BITS = (8, 4, 2)
"""Widths a code can be read at: the whole byte, its top nibble, its top two bits."""

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The reduced-precision paths of aten::_weight_int8pack_mm use aligned SIMD loads and step
# through K in blocks of 16 on AVX-512 (8 on AVX2) without a remainder loop: a K that is not
# a multiple of 16, or a misaligned pointer, crashes the process or returns garbage.
_KERNEL_K_MULTIPLE = 16
_KERNEL_ALIGN = 64


@dataclass
class MatryoshkaCodes:
    """Quantised weight matrix: offset-binary int8 codes and float32 scales.

    codes: uint8 [out, in], u = q + 128 with q in [-128, 127].
    scales: float32 [out, n_groups]; group g covers inputs [g * group_size, (g + 1) * group_size).
    group_size: inputs per scale (in_features for one scale per output channel).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    group_size: int

    @property
    def n_groups(self) -> int:
        """Scales per output channel."""
        return int(self.scales.shape[1])


def quantize(weight: torch.Tensor, group_size: int | None = None) -> MatryoshkaCodes:
    """Symmetric int8 quantisation of a [out, in] weight, per output channel or per input group.

    scale = max|w| / 127 over each group (1 for an all-zero group); q = round(w / scale).
    Always computed in float32, whatever the weight's dtype.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    size = in_features if group_size is None else group_size
    if size <= 0 or in_features % size != 0:
        raise ValueError(
            f"group_size must be a positive divisor of in_features={in_features}, got {group_size}"
        )
    n_groups = in_features // size
    w = weight.detach().to(torch.float32).reshape(out_features, n_groups, size)
    amax = w.abs().amax(dim=-1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scales.unsqueeze(-1)).clamp_(-128, 127)
    codes = (q.to(torch.int16) + 128).to(torch.uint8).reshape(out_features, in_features)
    return MatryoshkaCodes(codes=codes.contiguous(), scales=scales.contiguous(), group_size=size)


def _check_bits(bits: int) -> None:
    if bits not in SLICE_BITS:
        raise ValueError(f"bits must be one of {SLICE_BITS}, got {bits}")


def slice_codes(codes: MatryoshkaCodes, bits: int) -> torch.Tensor:
    """The r-bit code of every weight: the top r bits of its byte, uint8 in [0, 2**r)."""
    _check_bits(bits)
    return codes.codes >> (8 - bits)


def _sliced_values(codes: MatryoshkaCodes, bits: int) -> torch.Tensor:
    """Signed int8-range code of each r-bit slice, at its bucket centre, as int16 [out, in]."""
    shift = 8 - bits
    centre = (1 << (shift - 1)) if bits < 8 else 0
    c = slice_codes(codes, bits).to(torch.int16)
    return (c << shift) + (centre - 128)


def sliced_int8(codes: MatryoshkaCodes, bits: int) -> torch.Tensor:
    """int8 [out, in] values whose product with the scales is dequantize(codes, bits).

    bits=8 gives q itself; bits=4 gives -120..120 in steps of 16; bits=2 gives -96, -32, 32, 96.
    """
    return _sliced_values(codes, bits).to(torch.int8)


def dequantize(
    codes: MatryoshkaCodes, bits: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Weights [out, in] rebuilt from the r-bit slice, read at the centre of its bucket."""
    values = _sliced_values(codes, bits).to(torch.float32)
    out_features, in_features = values.shape
    grouped = values.reshape(out_features, codes.n_groups, codes.group_size)
    weight = grouped * codes.scales.to(torch.float32).unsqueeze(-1)
    return weight.reshape(out_features, in_features).to(dtype)


def int8_kernel_supports(dtype: torch.dtype, in_features: int) -> bool:
    """Whether int8_linear can take inputs of this dtype and width (given a working kernel)."""
    if dtype not in _KERNEL_DTYPES:
        return False
    return dtype == torch.float32 or in_features % _KERNEL_K_MULTIPLE == 0


@functools.cache
def int8_kernel_available() -> bool:
    """Whether aten::_weight_int8pack_mm runs and is right here, for float32 and bfloat16 input."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return False
    gen = torch.Generator().manual_seed(0)
    # K = 32 and fresh (aligned) tensors: shapes the bf16 path handles without crashing.
    x = torch.randn(3, 32, generator=gen)
    w = torch.randint(-128, 128, (5, 32), dtype=torch.int8, generator=gen)
    s = torch.rand(5, generator=gen) + 0.5
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        xd, sd = x.to(dtype), s.to(dtype)
        ref = xd.float() @ (w.float() * sd.float()[:, None]).T
        try:
            y = op(xd, w, sd)
        except (RuntimeError, NotImplementedError):
            return False
        if y.shape != ref.shape or y.dtype != dtype:
            return False
        if not torch.allclose(y.float(), ref, rtol=tol, atol=tol * float(ref.abs().max())):
            return False
    return True


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself if contiguous and 64-byte aligned, else an aligned contiguous copy. (Inside a
    compiled graph every buffer the graph allocates is aligned, and no pointer is known.)"""
    if torch.compiler.is_compiling():
        return t.contiguous()
    if t.is_contiguous() and t.data_ptr() % _KERNEL_ALIGN == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def int8_linear(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ (weight_int8 * scales[:, None]).T + bias with the int8-weight kernel.

    x: [..., in] float32, bfloat16 or float16 (in % 16 == 0 unless float32); the output has
    x's dtype. weight_int8: int8 [out, in]. scales: one per output channel, [out] or [out, 1];
    the kernel wants them in x's dtype, so for bfloat16 input they are rounded to bfloat16.
    """
    if weight_int8.dtype != torch.int8 or weight_int8.dim() != 2:
        raise ValueError(
            f"weight_int8 must be int8 [out, in], got {weight_int8.dtype} "
            f"{tuple(weight_int8.shape)}"
        )
    out_features, in_features = weight_int8.shape
    if scales.dim() == 2 and scales.shape[1] != 1:
        raise ValueError(
            f"int8_linear needs one scale per output channel; got {scales.shape[1]} groups"
        )
    if scales.numel() != out_features:
        raise ValueError(f"expected {out_features} scales, got shape {tuple(scales.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {in_features}")
    if not int8_kernel_supports(x.dtype, in_features):
        raise ValueError(
            f"the int8 kernel takes float32 input of any width, or bfloat16/float16 input whose "
            f"width is a multiple of {_KERNEL_K_MULTIPLE}; got {x.dtype} with {in_features}"
        )
    lead = x.shape[:-1]
    x2 = _aligned(x.reshape(-1, in_features))
    w = _aligned(weight_int8)
    s = _aligned(scales.reshape(out_features).to(x.dtype))
    y = torch.ops.aten._weight_int8pack_mm(x2, w, s)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, out_features)


# ---------------------------------------------------------------- bit planes for the int4 kernel

PLANES: dict[int, tuple[str, ...]] = {8: ("hi", "lo"), 4: ("hi",), 2: ("two",)}
"""The int4 planes whose products add up to each width."""
SIMULATED_BITS = frozenset({2})
"""Widths whose plane reads more bytes than the width says (2 bits stored as 4)."""
# Plane p holds 4-bit values v; its weights are s * (mult * (v - 8) + zero): see the module doc.
_PLANE_AFFINE: dict[str, tuple[float, float]] = {
    "hi": (16.0, 8.0),
    "lo": (1.0, 0.0),
    "two": (64.0, 32.0),
}
PLANE_KERNEL_GROUPS = (256, 128, 64, 32)
"""Input-group sizes the CPU int4 kernel takes, largest (fewest scales to read) first."""
PLANE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PLANE_N_MULTIPLE = 16


def planes_for(widths: tuple[int, ...] | list[int]) -> tuple[str, ...]:
    """The planes that products at ``widths`` read, each once (8 and 4 share ``hi``)."""
    for bits in widths:
        _check_bits(bits)
    return tuple(p for p in ("hi", "lo", "two") if any(p in PLANES[b] for b in widths))


def plane_values(codes: MatryoshkaCodes, plane: str) -> torch.Tensor:
    """The 4-bit values 0..15 of one plane, uint8 [out, in]."""
    u = codes.codes
    if plane == "hi":
        return u >> 4
    if plane == "lo":
        return u & 15
    if plane == "two":
        return (u >> 6) + 6
    raise ValueError(f"unknown plane {plane!r}; planes are hi, lo, two")


def kernel_group(in_features: int, group_size: int | None = None) -> int | None:
    """The largest kernel group that divides both the input width and the scale group (one
    scale per output channel: the input width), or None where none does. Scales of a larger
    group are repeated over its kernel groups, which changes no number."""
    size = in_features if group_size is None else group_size
    for group in PLANE_KERNEL_GROUPS:
        if in_features % group == 0 and size % group == 0:
            return group
    return None


def plane_groups(in_features: int, group_size: int | None = None) -> int:
    """Scale groups per output channel the planes layout keeps: one per kernel group, or
    (where no kernel group fits) one per scale group."""
    group = kernel_group(in_features, group_size)
    if group is None:
        group = in_features if group_size is None else group_size
    return in_features // group


def planes_unsupported(
    out_features: int,
    in_features: int,
    group_size: int | None,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> str | None:
    """Why the CPU int4 kernel cannot multiply this matrix by inputs of ``dtype`` (None: it
    can). Whether this torch build has a working kernel at all is asked separately."""
    if torch.device(device).type != "cpu":
        return f"the int4 planes kernel is CPU-only, the weights are on {device}"
    if dtype not in PLANE_DTYPES:
        return f"the int4 planes kernel takes float32, bfloat16 or float16 input, not {dtype}"
    if out_features % _PLANE_N_MULTIPLE:
        return f"output width {out_features} is not a multiple of {_PLANE_N_MULTIPLE}"
    if kernel_group(in_features, group_size) is None:
        scale = "" if group_size is None else f" and scale group {group_size}"
        return (
            f"no kernel group {PLANE_KERNEL_GROUPS[::-1]} divides input width {in_features}{scale}"
        )
    return None


@dataclass
class BitPlanes:
    """A weight matrix as int4 planes packed for ``aten._weight_int4pack_mm_for_cpu``.

    packed: plane name -> the kernel's packed codes. scales_zeros: plane name -> [in / group,
    out, 2] (scale, zero) in the activation dtype, the kernel's layout. group_size: the
    kernel's group (a divisor of the quantisation group).
    """

    packed: dict[str, torch.Tensor]
    scales_zeros: dict[str, torch.Tensor]
    group_size: int
    out_features: int
    in_features: int

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.scales_zeros.values())).dtype

    @property
    def storage_bytes(self) -> int:
        """Bytes held: every plane's packed codes and its scales and zeros."""
        tensors = [*self.packed.values(), *self.scales_zeros.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def plane_scales_zeros(
    codes: MatryoshkaCodes, plane: str, group: int, dtype: torch.dtype
) -> torch.Tensor:
    """[in / group, out, 2] (scale, zero) of one plane: (mult * s, zero * s) with s repeated
    over the kernel groups of its scale group. The multipliers are powers of two, so rounding
    to a reduced dtype rounds s once, the same for every plane."""
    mult, zero = _PLANE_AFFINE[plane]
    if codes.group_size % group:
        raise ValueError(f"kernel group {group} does not divide scale group {codes.group_size}")
    s = codes.scales.to(torch.float32).repeat_interleave(codes.group_size // group, dim=1)
    pair = torch.stack([s * mult, s * zero], dim=-1)  # [out, in / group, 2]
    return pair.transpose(0, 1).to(dtype).contiguous()


def pack_planes(codes: MatryoshkaCodes, planes: tuple[str, ...], dtype: torch.dtype) -> BitPlanes:
    """The given planes of ``codes``, packed for the CPU int4 kernel with inputs of ``dtype``
    (ValueError where the kernel cannot take the shape: see ``planes_unsupported``)."""
    out_features, in_features = codes.codes.shape
    why = planes_unsupported(out_features, in_features, codes.group_size, dtype, codes.codes.device)
    if why is not None:
        raise ValueError(why)
    group = kernel_group(in_features, codes.group_size)
    pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    return BitPlanes(
        packed={p: pack(plane_values(codes, p).to(torch.int32).contiguous(), 1) for p in planes},
        scales_zeros={p: plane_scales_zeros(codes, p, group, dtype) for p in planes},
        group_size=group,
        out_features=out_features,
        in_features=in_features,
    )


def planes_linear(
    x: torch.Tensor, planes: BitPlanes, bits: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ dequantize(codes, bits).T + bias through the int4 kernel, one call per plane of
    the width (two for 8 bits, one for 4 and 2). x: [..., in] in the planes' dtype."""
    _check_bits(bits)
    if x.shape[-1] != planes.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {planes.in_features}")
    if x.dtype != planes.dtype:
        raise ValueError(f"x is {x.dtype}, the planes' scales are {planes.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, planes.in_features).contiguous()
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    y = None
    for plane in PLANES[bits]:
        part = mm(x2, planes.packed[plane], planes.group_size, planes.scales_zeros[plane])
        y = part if y is None else y.add_(part)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, planes.out_features)


def plane_bytes(
    out_features: int, in_features: int, bits: int, n_groups: int, scale_bytes: int
) -> int:
    """Bytes one product at ``bits`` reads from the planes layout: half a byte per weight per
    plane (width 2 reads a 4-bit plane: simulated) plus a (scale, zero) pair of
    ``scale_bytes`` each per group per plane."""
    _check_bits(bits)
    if n_groups < 1 or scale_bytes < 1:
        raise ValueError(f"need n_groups >= 1 and scale_bytes >= 1, got {n_groups}, {scale_bytes}")
    per_plane = (out_features * in_features + 1) // 2 + out_features * n_groups * 2 * scale_bytes
    return len(PLANES[bits]) * per_plane


def plane_storage_bytes(
    out_features: int, in_features: int, widths: tuple[int, ...], n_groups: int, scale_bytes: int
) -> int:
    """Bytes the planes for ``widths`` occupy, each plane counted once (8 and 4 share hi)."""
    per_plane = plane_bytes(out_features, in_features, 4, n_groups, scale_bytes)
    return len(planes_for(widths)) * per_plane


# ---------------------------------------------------------------- int4 codes (GGUF Q4 blocks
# and our int4 format)


@dataclass
class Int4Codes:
    """Weights [out, in] as ``(codes - 8) * scales + zeros``, one scale and zero per group of
    ``group_size`` inputs. codes: uint8 in 0..15 [out, in]; scales, zeros: float32 [out, in/g]."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out_features, in_features = self.codes.shape
        grouped = (self.codes.float() - 8).view(out_features, -1, self.group_size)
        weight = grouped * self.scales.unsqueeze(-1) + self.zeros.unsqueeze(-1)
        return weight.view(out_features, in_features).to(dtype)


def quantize_int4(weight: torch.Tensor, group_size: int) -> Int4Codes:
    """Asymmetric min/max 4-bit codes per group (GGUF Q4_1's rule): scale = (max - min) / 15,
    the group's minimum at code 0, codes rounded to nearest."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    w = weight.detach().float().view(out_features, -1, group_size)
    low, high = w.amin(-1), w.amax(-1)
    scales = (high - low) / 15
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round((w - low.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp_(0, 15)
    zeros = low + 8 * scales  # (q - 8) * scale + zero == low + q * scale
    return Int4Codes(
        codes.to(torch.uint8).view(out_features, in_features), scales, zeros, group_size
    )
