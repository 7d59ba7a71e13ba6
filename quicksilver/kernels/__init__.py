"""Our native kernels: int4 and int8 weights times int8-rounded activations
(``int_linear.cpp``); bf16 weights times bf16 activations for decode steps
(``bf16_linear.cpp``, CPUs with AVX-512 BF16: it streams a one-row product at the machine's
bandwidth, where oneDNN's pre-packed product reached ~70% of it); and attention query by query
(``attend_each.cpp``).

Why they exist: torch's CPU int4 kernel costs 2.6x a one-row product at 8 rows and 4.7x at
16 (docs/results/kernel-rows.md), so verifying 8 drafted tokens cost ~1.7 decode steps. These
kernels unpack each weight block once per call and multiply every row against it with
integer dot products (AVX-512 VNNI, or AVX2), so their cost grows more slowly with rows. Each
row's activations are rounded to int8 per block of 32 inputs, as llama.cpp does for GGUF's Q4
and Q8 blocks; that is a numerical choice of its own, so the formats' perplexity is measured
with it (docs/results/int-kernels/formats.md). A row's output does not depend on the other
rows of the call, bit for bit.

Verified decoding: its tokens are plain decoding's only if a verify forward of k tokens
computes each token's logits exactly as k one-token steps do. Our products do; attention over
k queries (SDPA) and over one (two matmuls) round differently in the last bits, and rounding
activations to int8 turns such a difference into a whole int8 step now and then (SmolLM2-135M
int4, fp32: up to 0.77 apart in the logits, against 5e-5 with torch's kernels). So where our
kernels run, the engine attends query by query in a fixed order (``attend_each``,
``attend_each.cpp``), and the two agree bit for bit, in fp32 and bf16.

Opt-in (``QUICKSILVER_KERNELS=ours``; ``wanted()``): they change the formats' numerics, need a
C++ compiler on first use, and have been measured on one CPU family.

The source is compiled once per machine and torch version on first use (~15-30 s, a line on
stderr says so) into ``<QUICKSILVER_CACHE>/kernels``; where that fails (no compiler, a CPU
without AVX2, not x86-64) torch's kernels run and ``unavailable_reason()`` says why.

The layout helpers here are pure tensor functions; the kernel's layout is documented in the
C++ source.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

TILE = 16  # outputs per tile
BLOCK = 32  # inputs per block
_SOURCES = [
    Path(__file__).with_name(name)
    for name in ("int_linear.cpp", "attend_each.cpp", "bf16_linear.cpp")
]
_state: dict[str, str | float] = {}


def _cache_dir() -> Path:
    env = os.environ.get("QUICKSILVER_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "quicksilver"
    version = torch.__version__.replace("+", "-")
    return root / "kernels" / f"torch-{version}"


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch builds with the ``ninja`` on PATH; the ``ninja`` wheel we depend on installs one
    beside this interpreter, which is not on PATH when the venv is not activated."""
    old = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), old])
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _build() -> None:
    from torch.utils import cpp_extension

    directory = _cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    fresh = not any(directory.glob("*.so"))
    if fresh:
        print("quicksilver: building the int8/int4 kernels (once per machine)...", file=sys.stderr)
    start = time.perf_counter()
    with _ninja_on_path():
        cpp_extension.load(
            name="quicksilver_int_linear",
            sources=[str(path) for path in _SOURCES],
            # OpenMP as torch's own build: ATen's parallel_for is inlined from its headers
            # and runs serially in code compiled without it. The library it links is the
            # libgomp torch has already loaded, so there is one thread pool.
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    _state["build_seconds"] = time.perf_counter() - start

    @torch.library.register_fake("quicksilver::int_linear")
    def _(x, packed, channel_scales, tile_start, tile_stop, isa):
        return x.new_empty(x.shape[0], (tile_stop - tile_start) * TILE)

    @torch.library.register_fake("quicksilver::attend_each")
    def _(q, keys, values, reads, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("quicksilver::bf16_linear")
    def _(x, packed):
        return x.new_empty(x.shape[0], packed.shape[0] * TILE)


def wanted() -> bool:
    """Whether ``QUICKSILVER_KERNELS=ours`` asks int4 and int8 weights loaded from now on to
    run our kernels (read at each load, so one process can compare the two). Off by default:
    see the module's note on verified decoding."""
    return os.environ.get("QUICKSILVER_KERNELS", "torch") == "ours"


def command_prefix() -> str:
    """What a benchmark's printed command needs in front to run on the same kernels:
    ``QUICKSILVER_KERNELS=ours `` when it ran on ours, else nothing."""
    return "QUICKSILVER_KERNELS=ours " if wanted() else ""


@functools.cache
def available() -> bool:
    """Whether the kernel is built, loads, runs here and agrees with ``reference_linear``."""
    try:
        _build()
        if best_isa() == "none":
            _state["reason"] = "this CPU has neither AVX-512 VNNI nor AVX2"
            return False
        gen = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8, generator=gen)
        scales, mins = torch.rand(32, 2, generator=gen) + 0.1, torch.randn(32, 2, generator=gen)
        x = torch.randn(3, 64, generator=gen)
        packed = pack(codes, scales, mins, 32)
        got, want = linear(x, packed), reference_linear(x, packed)
        codes8 = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=gen)
        packed8, channel = pack8(codes8), torch.rand(32, generator=gen)
        got = torch.cat([got, linear8(x, packed8, channel)], 1)
        want = torch.cat([want, reference_linear(x, packed8, channel)], 1)
    except Exception as error:  # a missing compiler or a failed build: keep torch's kernel
        _state["reason"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        return False
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        _state["reason"] = "the built kernel disagrees with its reference"
        return False
    return True


def unavailable_reason() -> str | None:
    """Why int4 runs torch's kernel instead (None when ours is in use or not yet tried)."""
    return None if available() else str(_state.get("reason"))


def build_seconds() -> float:
    """Seconds this process spent building or loading the kernel (0 when not loaded)."""
    return float(_state.get("build_seconds", 0.0))


def best_isa() -> str:
    """``avx512`` (VNNI), ``avx2`` or ``none``: the path ``linear`` takes on this CPU."""
    return torch.ops.quicksilver.int_linear_best_isa()


def tiles_of(rows: slice) -> slice | None:
    """The tiles that output rows ``rows`` (start and stop given) cover, or None where the
    band does not start and stop on tiles."""
    if rows.start % TILE or rows.stop % TILE:
        return None
    return slice(rows.start // TILE, rows.stop // TILE)


def linear(
    x: torch.Tensor, packed: torch.Tensor, tiles: slice = slice(None), isa: str = "auto"
) -> torch.Tensor:
    """x [M, K] (float32 or bfloat16) times the packed weight's tiles, in x's dtype."""
    start, stop, _ = tiles.indices(packed.shape[0])
    return torch.ops.quicksilver.int_linear(x, packed, None, start, stop, isa)


def linear8(
    x: torch.Tensor,
    packed: torch.Tensor,
    channel_scales: torch.Tensor,
    tiles: slice = slice(None),
    isa: str = "auto",
) -> torch.Tensor:
    """x [M, K] times an int8 weight packed by ``pack8``, in x's dtype."""
    start, stop, _ = tiles.indices(packed.shape[0])
    return torch.ops.quicksilver.int_linear(x, packed, channel_scales, start, stop, isa)


@functools.cache
def bf16_available() -> bool:
    """Whether ``linear_bf16`` runs here: our kernels built and a CPU with AVX-512 BF16."""
    return available() and bool(torch.ops.quicksilver.bf16_linear_supported())


def linear_bf16(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bfloat16) times a weight packed by ``pack_bf16`` -> [M, N] bfloat16."""
    return torch.ops.quicksilver.bf16_linear(x, packed)


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 weight [N, K] (N a multiple of 16, K of 32) in ``bf16_linear.cpp``'s layout
    [N/16, K/32, 512]: per tile of 16 outputs and block of 32 inputs, 16 vectors whose lane n
    holds output n's pair of inputs (2j, 2j + 1)."""
    n, k = weight.shape
    pairs = weight.to(torch.bfloat16).reshape(n // TILE, TILE, k // BLOCK, BLOCK // 2, 2)
    return pairs.permute(0, 2, 3, 1, 4).contiguous().view(n // TILE, k // BLOCK, BLOCK * TILE)


def attend_each(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, reads: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of q [B, S, H, D] (float32) over keys/values [B, KVH, T, D] (a cache slice,
    float32 or bfloat16), query (b, s) reading the keys where ``reads`` [B, S, T] is True.
    Every query is computed alone, in a fixed order over the keys it reads, so its output does
    not depend on the other queries or on the keys it does not read: a verify forward of k
    tokens and k one-token steps give the same bits (``attend_each.cpp``)."""
    return torch.ops.quicksilver.attend_each(q, keys, values, reads, scale)


# ---------------------------------------------------------------- layouts (pure functions)


def pack(
    codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int
) -> torch.Tensor:
    """codes uint8 0..15 [N, K]; scales, mins float [N, K / group_size] with
    ``w = code * scale + min`` -> uint8 [N/16, K/32, 320]: per tile of 16 outputs and block of
    32 inputs, the codes (two a byte) then 16 float16 scales and 16 float16 mins."""
    n, k = codes.shape
    tiles, blocks = n // TILE, k // BLOCK
    quads = codes.view(tiles, TILE, blocks, 8, 4).permute(0, 2, 3, 1, 4)  # t, b, quad, lane, i
    nibbles = (quads[:, :, :4] | (quads[:, :, 4:] << 4)).reshape(tiles, blocks, 256)
    per_block = group_size // BLOCK

    def by_block(values: torch.Tensor) -> torch.Tensor:  # [N, K/g] -> bytes [T, B, 32]
        expanded = values.half().repeat_interleave(per_block, dim=1)  # [N, K/32]
        lanes = expanded.view(tiles, TILE, blocks).transpose(1, 2).contiguous()
        return lanes.view(torch.uint8)

    return torch.cat([nibbles, by_block(scales), by_block(mins)], dim=2).contiguous()


def unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pack``'s inverse: codes uint8 [N, K], and float32 scales and mins per block of 32
    inputs [N, K/32]."""
    tiles, blocks, _ = packed.shape
    halves = packed[..., :256].reshape(tiles, blocks, 4, TILE, 4)
    quads = torch.cat([halves & 15, halves >> 4], dim=2)  # t, b, quad, lane, i
    codes = quads.permute(0, 3, 1, 2, 4).reshape(tiles * TILE, blocks * BLOCK).contiguous()

    def values(start: int) -> torch.Tensor:
        lanes = packed[..., start : start + 32].contiguous().view(torch.float16).float()
        return lanes.transpose(1, 2).reshape(tiles * TILE, blocks)

    return codes, values(256), values(288)


def dequantize(packed: torch.Tensor) -> torch.Tensor:
    """The float32 weight [N, K] that a packed weight stands for."""
    codes, scales, mins = unpack(packed)
    return codes.float() * scales.repeat_interleave(BLOCK, 1) + mins.repeat_interleave(BLOCK, 1)


def pack8(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] -> uint8 [N/16, K/32, 512]: per tile of 16 outputs and block of 32
    inputs, 8 vectors of 4 consecutive inputs for each of the 16 outputs."""
    n, k = codes.shape
    quads = codes.view(n // TILE, TILE, k // BLOCK, 8, 4).permute(0, 2, 3, 1, 4)
    return quads.reshape(n // TILE, k // BLOCK, 512).contiguous().view(torch.uint8)


def unpack8(packed: torch.Tensor) -> torch.Tensor:
    """``pack8``'s inverse: int8 codes [N, K]."""
    tiles, blocks, _ = packed.shape
    quads = packed.view(torch.int8).view(tiles, blocks, 8, TILE, 4).permute(0, 3, 1, 2, 4)
    return quads.reshape(tiles * TILE, blocks * BLOCK).contiguous()


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's rounding of x [M, K]: int8-valued codes (as float) and the scale of each
    row's block of 32 [M, K/32]: scale = max|x| / 127, codes = round(x / scale)."""
    blocks = x.float().view(x.shape[0], -1, BLOCK)
    scale = blocks.abs().amax(-1) / 127
    inverse = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
    codes = torch.round(blocks * inverse.unsqueeze(-1))
    return codes.view_as(x), scale


def reference_linear(
    x: torch.Tensor, packed: torch.Tensor, channel_scales: torch.Tensor | None = None
) -> torch.Tensor:
    """What the kernel computes (int4, or int8 with ``channel_scales``), in float64 from the
    same roundings: the test oracle."""
    q, scale = quantize_activations(x)
    x_rounded = (q.view(x.shape[0], -1, BLOCK) * scale.unsqueeze(-1)).view_as(x).double()
    if channel_scales is None:
        weight = dequantize(packed).double()
    else:
        weight = unpack8(packed).double() * channel_scales.double().unsqueeze(1)
    return (x_rounded @ weight.T).to(x.dtype)
