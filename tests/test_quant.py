"""Matryoshka codes: the int4/int2 codes are the top bits of the int8 code, and each width
reconstructs the weights within half a bucket; the int8 kernel computes the same product, and
so do the int4 bit planes (two products for 8 bits, one for 4, one simulated for 2)."""

from __future__ import annotations

import pytest
import torch

from quicksilver import quant
from quicksilver.models.formats import int4_kernel_available
from quicksilver.quant import (
    MatryoshkaCodes,
    dequantize,
    int8_kernel_available,
    int8_linear,
    quantize,
    slice_codes,
    sliced_int8,
)

HALF_BUCKET = {8: 0, 4: 8, 2: 32}


def _weight(out_features: int = 48, in_features: int = 128, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen)
    w[::7, 5] *= 12.0  # a few outliers, so per-group scales have something to win
    return w


def _expanded_scales(codes: MatryoshkaCodes) -> torch.Tensor:
    return codes.scales.repeat_interleave(codes.group_size, dim=1)


def test_codes_layout() -> None:
    codes = quantize(_weight(), group_size=32)
    assert codes.codes.dtype == torch.uint8 and codes.codes.shape == (48, 128)
    assert codes.scales.dtype == torch.float32 and codes.scales.shape == (48, 4)
    assert codes.n_groups == 4 and codes.group_size == 32
    per_channel = quantize(_weight())
    assert per_channel.n_groups == 1 and per_channel.group_size == 128


def test_narrow_codes_are_the_top_bits_of_the_int8_code() -> None:
    codes = quantize(_weight())
    u = codes.codes
    assert torch.equal(slice_codes(codes, 8), u)
    assert torch.equal(slice_codes(codes, 4), u >> 4)
    assert torch.equal(slice_codes(codes, 2), u >> 6)
    assert torch.equal(slice_codes(codes, 2), slice_codes(codes, 4) >> 2)
    for bits in (4, 2):
        c = slice_codes(codes, bits)
        assert c.dtype == torch.uint8 and int(c.max()) < 2**bits
        for j in range(bits):  # bit j of the r-bit code is bit (8 - r + j) of the byte
            assert torch.equal((c >> j) & 1, (u >> (8 - bits + j)) & 1)


def test_int8_error_is_at_most_half_a_step() -> None:
    w = _weight()
    codes = quantize(w)
    err = (dequantize(codes, 8) - w).abs()
    assert torch.all(err <= _expanded_scales(codes) * (0.5 + 1e-5))
    q = codes.codes.to(torch.int16) - 128
    assert int(q.abs().max()) == 127  # the largest weight of each row maps to +-127


def test_quantize_computes_in_float32() -> None:
    w = _weight().to(torch.bfloat16)
    a, b = quantize(w), quantize(w.float())
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    assert dequantize(a, 4, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [4, 2])
def test_narrow_error_is_half_a_bucket(bits: int) -> None:
    w = _weight()
    codes = quantize(w)
    half = HALF_BUCKET[bits]
    q = codes.codes.to(torch.int16) - 128
    # In code space the centre of the bucket is at most half a bucket from the int8 code...
    assert int((sliced_int8(codes, bits).to(torch.int16) - q).abs().max()) <= half
    # ...so in weight space the error adds at most the int8 rounding (half a step).
    err = (dequantize(codes, bits) - w) / _expanded_scales(codes)
    assert float(err.abs().max()) <= half + 0.5 + 1e-4
    # Reading at the bucket centre keeps truncation (nearly) unbiased: an integer centre sits
    # half a step above the bucket's midpoint, 1/32 of an int4 bucket.
    assert abs(float(err.mean())) < 0.05 * 2 * half


def test_zero_row_is_safe() -> None:
    w = _weight()
    w[3] = 0.0
    codes = quantize(w, group_size=32)
    assert torch.all(torch.isfinite(codes.scales)) and torch.all(codes.scales[3] > 0)
    assert torch.equal(dequantize(codes, 8)[3], torch.zeros(128))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_groups_are_at_least_as_accurate_as_channels(bits: int) -> None:
    w = _weight()
    per_channel = (dequantize(quantize(w), bits) - w).pow(2).mean()
    per_group = (dequantize(quantize(w, group_size=16), bits) - w).pow(2).mean()
    assert per_group <= per_channel


@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_sliced_int8_times_scale_is_dequantize(bits: int, group_size: int | None) -> None:
    codes = quantize(_weight(), group_size=group_size)
    s = sliced_int8(codes, bits)
    assert s.dtype == torch.int8
    assert torch.equal(s.float() * _expanded_scales(codes), dequantize(codes, bits))


def test_sliced_int8_values() -> None:
    codes = quantize(_weight(out_features=64, in_features=256))
    assert sliced_int8(codes, 2).unique().tolist() == [-96, -32, 32, 96]
    assert sliced_int8(codes, 4).unique().tolist() == list(range(-120, 121, 16))


@pytest.mark.skipif(not int8_kernel_available(), reason="no _weight_int8pack_mm on this build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_int8_linear_matches_dequantized_matmul(dtype: torch.dtype, bits: int) -> None:
    gen = torch.Generator().manual_seed(1)
    codes = quantize(_weight())
    x = torch.randn(2, 5, 128, generator=gen).to(dtype)
    bias = torch.randn(48, generator=gen)
    y = int8_linear(x, sliced_int8(codes, bits), codes.scales, bias)
    assert y.shape == (2, 5, 48) and y.dtype == dtype
    ref = x.float() @ dequantize(codes, bits).T + bias
    # bfloat16: x's scales and the output are rounded to bfloat16 (2**-9 relative each).
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert float((y.float() - ref).abs().max()) <= tol * float(ref.abs().max())


@pytest.mark.skipif(not int8_kernel_available(), reason="no _weight_int8pack_mm on this build")
def test_int8_linear_copes_with_misaligned_bf16_input() -> None:
    # The bf16 kernel does aligned loads: a view two bytes into its storage would crash it.
    codes = quantize(_weight())
    x = torch.randn(3 * 128 + 1).to(torch.bfloat16)[1:].view(3, 128)
    y = int8_linear(x, sliced_int8(codes, 4), codes.scales[:, 0], None)
    ref = x.float() @ dequantize(codes, 4).T
    assert float((y.float() - ref).abs().max()) <= 1e-2 * float(ref.abs().max())


def test_int8_linear_rejects_what_the_kernel_cannot_run() -> None:
    codes = quantize(_weight(in_features=24), group_size=12)
    w8 = sliced_int8(codes, 8)
    with pytest.raises(ValueError, match="one scale per output channel"):
        int8_linear(torch.randn(2, 24), w8, codes.scales, None)
    with pytest.raises(ValueError, match="multiple of 16"):
        int8_linear(torch.randn(2, 24).bfloat16(), w8, codes.scales[:, :1], None)
    with pytest.raises(ValueError, match="features"):
        int8_linear(torch.randn(2, 16), w8, codes.scales[:, :1], None)
    assert not quant.int8_kernel_supports(torch.bfloat16, 24)
    assert quant.int8_kernel_supports(torch.float32, 24)


@pytest.mark.parametrize("group_size", [0, -4, 3, 256])
def test_bad_group_size(group_size: int) -> None:
    with pytest.raises(ValueError, match="group_size must be a positive divisor"):
        quantize(_weight(), group_size=group_size)


def test_bad_weight_rank() -> None:
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(4, 4, 4))


@pytest.mark.parametrize("bits", [0, 1, 3, 16])
def test_bad_bits(bits: int) -> None:
    codes = quantize(_weight())
    for fn in (slice_codes, sliced_int8, dequantize):
        with pytest.raises(ValueError, match="bits must be one of"):
            fn(codes, bits)


# ---------------------------------------------------------------- bit planes

needs_int4 = pytest.mark.skipif(not int4_kernel_available(), reason="no CPU int4 kernel here")


def test_planes_split_the_code() -> None:
    codes = quantize(_weight())
    hi, lo, two = (quant.plane_values(codes, p) for p in ("hi", "lo", "two"))
    assert torch.equal(hi.to(torch.int16) * 16 + lo, codes.codes.to(torch.int16))
    assert torch.equal(two, (codes.codes >> 6) + 6)
    for plane in (hi, lo, two):
        assert plane.dtype == torch.uint8 and int(plane.max()) <= 15
    assert quant.planes_for((8, 4, 2)) == ("hi", "lo", "two")
    assert quant.planes_for((4,)) == ("hi",) and quant.planes_for((8,)) == ("hi", "lo")
    with pytest.raises(ValueError, match="unknown plane"):
        quant.plane_values(codes, "mid")


@pytest.mark.parametrize(
    ("in_features", "group_size", "group"),
    [(576, None, 64), (1536, None, 256), (576, 32, 32), (512, 512, 256), (48, None, None)]
    + [(512, 16, None), (96, 96, 32)],
)
def test_kernel_group(in_features: int, group_size: int | None, group: int | None) -> None:
    assert quant.kernel_group(in_features, group_size) == group


@needs_int4
@pytest.mark.parametrize("group_size", [None, 64])
def test_width8_planes_are_the_int8_product(group_size: int | None) -> None:
    """hi-plane (16 s, 8 s) plus lo-plane (s, 0) == x @ (s (u - 128))^T, to float rounding."""
    gen = torch.Generator().manual_seed(2)
    codes = quantize(_weight(), group_size=group_size)
    planes = quant.pack_planes(codes, ("hi", "lo"), torch.float32)
    x = torch.randn(7, 128, generator=gen)
    q = codes.codes.float() - 128
    ref = x @ (q * _expanded_scales(codes)).T
    y = quant.planes_linear(x, planes, 8)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    if group_size is None and int8_kernel_available():  # the same product as the int8 kernel
        y8 = int8_linear(x, sliced_int8(codes, 8), codes.scales, None)
        assert torch.allclose(y, y8, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@needs_int4
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_planes_linear_matches_dequantized_matmul(dtype: torch.dtype, bits: int) -> None:
    gen = torch.Generator().manual_seed(3)
    codes = quantize(_weight(), group_size=64)
    planes = quant.pack_planes(codes, quant.planes_for((8, 4, 2)), dtype)
    x = torch.randn(2, 5, 128, generator=gen).to(dtype)
    bias = torch.randn(48, generator=gen)
    y = quant.planes_linear(x, planes, bits, bias)
    assert y.shape == (2, 5, 48) and y.dtype == dtype
    ref = x.float() @ dequantize(codes, bits).T + bias
    # Reduced dtypes: scales and each plane's output rounded (2**-9 relative each in bf16).
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert float((y.float() - ref).abs().max()) <= tol * float(ref.abs().max())


@needs_int4
def test_width4_reads_only_the_hi_plane() -> None:
    codes = quantize(_weight())
    both = quant.pack_planes(codes, ("hi", "lo"), torch.bfloat16)
    hi_only = quant.pack_planes(codes, ("hi",), torch.bfloat16)
    assert set(hi_only.packed) == {"hi"}
    assert hi_only.storage_bytes * 2 == both.storage_bytes
    assert hi_only.packed["hi"].numel() * hi_only.packed["hi"].element_size() == 48 * 128 // 2
    x = torch.randn(3, 128).bfloat16()
    # The same hi plane gives the width-4 product, with or without the lo plane beside it.
    assert torch.equal(quant.planes_linear(x, both, 4), quant.planes_linear(x, hi_only, 4))
    with pytest.raises(KeyError):
        quant.planes_linear(x, hi_only, 8)  # the lo plane was never built


@needs_int4
def test_planes_cope_with_misaligned_bf16_input() -> None:
    codes = quantize(_weight())
    planes = quant.pack_planes(codes, ("hi",), torch.bfloat16)
    x = torch.randn(3 * 128 + 1).to(torch.bfloat16)[1:].view(3, 128)
    ref = x.float() @ dequantize(codes, 4).T
    y = quant.planes_linear(x, planes, 4)
    assert float((y.float() - ref).abs().max()) <= 1e-2 * float(ref.abs().max())


def test_planes_unsupported_says_why() -> None:
    assert quant.planes_unsupported(48, 128, None, torch.bfloat16) is None
    assert quant.planes_unsupported(48, 128, 64, torch.float32) is None
    assert "multiple of 16" in quant.planes_unsupported(40, 128, None, torch.float32)
    assert "divides input width 48" in quant.planes_unsupported(48, 48, None, torch.float32)
    assert "scale group 16" in quant.planes_unsupported(48, 128, 16, torch.float32)
    assert "float64" in quant.planes_unsupported(48, 128, None, torch.float64)
    assert "CPU-only" in quant.planes_unsupported(48, 128, None, torch.float32, "meta")
    with pytest.raises(ValueError, match="multiple of 16"):
        quant.pack_planes(quantize(_weight(out_features=40)), ("hi",), torch.float32)
    with pytest.raises(ValueError, match="divides input width"):
        quant.pack_planes(quantize(_weight(in_features=48)), ("hi",), torch.float32)


@needs_int4
def test_planes_linear_rejects_mismatched_input() -> None:
    planes = quant.pack_planes(quantize(_weight()), ("hi",), torch.float32)
    with pytest.raises(ValueError, match="features"):
        quant.planes_linear(torch.randn(2, 64), planes, 4)
    with pytest.raises(ValueError, match="bfloat16"):
        quant.planes_linear(torch.randn(2, 128).bfloat16(), planes, 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        quant.planes_linear(torch.randn(2, 128), planes, 3)


def test_plane_bytes() -> None:
    # Width 8: two 4-bit planes (a byte a weight) and two (scale, zero) pairs per group.
    assert quant.plane_bytes(960, 576, 8, 9, 2) == 960 * 576 + 2 * 960 * 9 * 2 * 2
    assert quant.plane_bytes(960, 576, 4, 9, 2) == 960 * 576 // 2 + 960 * 9 * 2 * 2
    # Width 2 is simulated: it reads a 4-bit plane, the same bytes as width 4.
    assert 2 in quant.SIMULATED_BITS and 4 not in quant.SIMULATED_BITS
    assert quant.plane_bytes(960, 576, 2, 9, 2) == quant.plane_bytes(960, 576, 4, 9, 2)
    # Stored: 8 and 4 share the hi plane, so all three widths hold three planes, not four.
    per_plane = quant.plane_bytes(960, 576, 4, 9, 4)
    assert quant.plane_storage_bytes(960, 576, (8, 4, 2), 9, 4) == 3 * per_plane
    assert quant.plane_storage_bytes(960, 576, (8, 4), 9, 4) == 2 * per_plane
    assert quant.plane_storage_bytes(960, 576, (4,), 9, 4) == per_plane
    assert quant.plane_groups(576) == 9 and quant.plane_groups(48) == 1
    assert quant.plane_groups(128, 16) == 8
    with pytest.raises(ValueError):
        quant.plane_bytes(960, 576, 4, 0, 2)
