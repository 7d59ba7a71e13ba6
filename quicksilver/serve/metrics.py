"""Counters for ``GET /metrics`` in Prometheus' text format, written by hand (a handful of
counters do not justify a dependency).

Besides the usual request, token and latency figures, the server reports what only an
adaptive engine can: counted FLOPs next to the dense FLOPs of the same tokens (their ratio is
the compute a policy saved) and the layer-token rows that ran versus a dense run's.
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PREFIX = "quicksilver"


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.n += 1
        self.total += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [
            f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)
        ]
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total}"]
        return out + [f"{name}_count {self.n}"]


class Metrics:
    """Thread-safe: handlers count requests, the worker counts tokens and FLOPs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.counters: dict[str, float] = defaultdict(float)
        self.latency = Histogram()
        self.first_token = Histogram()
        self.batch_rows = Histogram(buckets=(1, 2, 4, 8, 16, 32, 64))

    def request(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            if seconds is not None:
                self.latency.observe(seconds)

    def time_to_first_token(self, seconds: float) -> None:
        with self._lock:
            self.first_token.observe(seconds)

    def add(self, **values: float) -> None:
        with self._lock:
            for name, value in values.items():
                self.counters[name] += value

    def batch(self, rows: int) -> None:
        with self._lock:
            self.batch_rows.observe(rows)
            self.counters["batches"] += 1

    def render(self, queued: int, running: int) -> str:
        """The exposition text (format 0.0.4)."""
        p = PREFIX
        with self._lock:
            lines = [
                f"# HELP {p}_requests_total HTTP requests by endpoint and status code.",
                f"# TYPE {p}_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'{p}_requests_total{{endpoint="{endpoint}",code="{status}"}} {n}')
            described = {
                "prompt_tokens": "Prompt tokens of served requests.",
                "generation_tokens": "Tokens generated.",
                "counted_flops": "FLOPs counted from the shapes the engine executed.",
                "dense_flops": "FLOPs the dense model would spend on the same tokens.",
                "layer_token_rows": "Token rows that ran a layer, summed over layers.",
                "dense_layer_token_rows": "Token rows a dense run would put through layers.",
                "halted_kv_token_rows": "Halted token rows whose K/V were still projected.",
                "batches": "Batches the worker ran.",
            }
            for name, help_text in described.items():
                lines += [
                    f"# HELP {p}_{name}_total {help_text}",
                    f"# TYPE {p}_{name}_total counter",
                    f"{p}_{name}_total {self.counters.get(name, 0):.0f}",
                ]
            counted, dense = self.counters.get("counted_flops", 0), self.counters.get("dense_flops")
            tokens = self.counters.get("processed_tokens", 0)
            gauges = {
                "flop_fraction_of_dense": (counted / dense) if dense else 1.0,
                "counted_flops_per_token": counted / tokens if tokens else 0.0,
                "dense_flops_per_token": (dense or 0) / tokens if tokens else 0.0,
                "queued_requests": queued,
                "running_requests": running,
            }
            for name, value in gauges.items():
                lines += [f"# TYPE {p}_{name} gauge", f"{p}_{name} {value}"]
            for name, hist in (
                ("request_latency_seconds", self.latency),
                ("time_to_first_token_seconds", self.first_token),
                ("batch_rows", self.batch_rows),
            ):
                lines += [f"# TYPE {p}_{name} histogram", *hist.lines(f"{p}_{name}")]
        return "\n".join(lines) + "\n"
