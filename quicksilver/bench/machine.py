"""The machine's limits, measured where the benchmark runs: memory read bandwidth bounds CPU
decode (every step reads the weights once), matmul throughput bounds prefill. Throughput
figures are reported as fractions of these, so a number says how close it came to the
hardware rather than only how fast it was."""

from __future__ import annotations

import os
import time
from typing import Any

import torch


def measure_memory_bandwidth(n_bytes: int = 256 * 1024**2, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of several full reads of a large initialised tensor.

    The tensor is much larger than the last-level cache, and reductions (sum, max) do almost
    no arithmetic per byte, so the fastest one is limited by memory.
    """
    data = torch.ones(n_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for op in (torch.sum, torch.max):
        op(data)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            op(data)
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def measure_matmul_flops(
    dtype: torch.dtype, n: int = 2048, repeats: int = 3, enough_s: float = 0.05
) -> float:
    """Dense matmul throughput in FLOP/s for `dtype`: the best of a few n x n x n products,
    n doubling from 256 until one product takes ``enough_s`` (or n is reached), so a dtype
    this CPU multiplies slowly (bf16 without hardware support: ~1 GFLOP/s) is measured in
    seconds, not minutes."""
    gen = torch.Generator().manual_seed(0)
    size = min(256, n)
    while True:
        a = torch.randn(size, size, generator=gen).to(dtype)
        b = torch.randn(size, size, generator=gen).to(dtype)
        torch.mm(a, b)  # warm-up
        start = time.perf_counter()
        torch.mm(a, b)
        best = time.perf_counter() - start
        if best >= enough_s or size >= n:
            break
        size *= 2
    for _ in range(repeats - 1):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the Linear weights one decode step reads; a tied LM head counts once.

    Embedding lookups read a few rows only and are ignored.
    """
    seen: set[int] = set()
    total = 0
    for linear in model.linears():
        first = next(iter(linear.buffers()), None) if not hasattr(linear, "weight") else None
        key = linear.weight.data_ptr() if first is None else first.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += linear.storage_bytes
    return total


def fractions_of_limit(
    result: dict[str, Any],
    weight_bytes: int,
    prefill_flops: int,
    bandwidth: float,
    matmul_flops: float,
) -> dict[str, float]:
    """How close one measurement came to the machine: decode vs bandwidth, prefill vs FLOP/s."""
    step = result["decode_step_seconds"]
    decode = (weight_bytes / step) / bandwidth if step > 0 else 0.0
    prefill_s = result["prefill_seconds"]
    prefill = (prefill_flops / prefill_s) / matmul_flops if prefill_s > 0 else 0.0
    return {
        "decode": decode,
        "prefill": prefill,
        "decode_weight_gb_s": weight_bytes / step / 1e9 if step > 0 else 0.0,
        "prefill_gflops": prefill_flops / prefill_s / 1e9 if prefill_s > 0 else 0.0,
    }


def load_average() -> float | None:
    """The 1-minute load average, None where the system keeps none: other processes' demand
    for the cores, which slows every number measured beside it."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
