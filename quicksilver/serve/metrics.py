"""``GET /metrics`` in Prometheus' text format, through ``prometheus_client``.

Besides the usual request, token and latency figures, the server reports what only an
adaptive engine can: counted FLOPs next to the dense FLOPs of the same tokens (their ratio is
the compute a policy saved), the layer-token rows that ran versus a dense run's, and how many
drafted tokens speculative decoding got accepted.

Each ``Metrics`` owns its registry, so several apps in one process (tests, benchmarks) never
share or collide on series. Labels are bounded by construction: the ``endpoint`` label is a
route template or ``"unmatched"`` (the app decides), never a raw path a client chose, so no
sequence of requests can grow the exposition without limit.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
PREFIX = "quicksilver"
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes

# The counters the worker adds to (``Metrics.add``), exported as ``quicksilver_<name>_total``.
COUNTERS = {
    "prompt_tokens": "Prompt tokens of served requests.",
    "generation_tokens": "Tokens generated.",
    "processed_tokens": "Tokens the engine fed through the model (prompt and generated).",
    "counted_flops": "FLOPs counted from the shapes the engine executed.",
    "dense_flops": "FLOPs the dense model would spend on the same tokens.",
    "layer_token_rows": "Token rows that ran a layer, summed over layers.",
    "dense_layer_token_rows": "Token rows a dense run would put through layers.",
    "halted_kv_token_rows": "Halted token rows whose K/V were still projected.",
    "batches": "Batches the worker ran.",
    "spec_decode_num_drafts": "Speculative decoding: draft proposals made.",
    "spec_decode_num_draft_tokens": "Speculative decoding: tokens drafted.",
    "spec_decode_num_accepted_tokens": "Speculative decoding: drafted tokens accepted.",
}

# Ratios derived from the counters when the exposition is rendered.
GAUGES = {
    "flop_fraction_of_dense": "Counted FLOPs over the dense FLOPs of the same tokens.",
    "counted_flops_per_token": "Counted FLOPs per processed token.",
    "dense_flops_per_token": "Dense FLOPs per processed token.",
    "queued_requests": "Requests waiting for a batch.",
    "running_requests": "Requests in the running batch.",
}


class Metrics:
    """Thread-safe: handlers count requests, the worker counts tokens and FLOPs.

    ``counters`` keeps the plain totals as well: the derived gauges are ratios of them, and
    callers (tests, the worker) read them without parsing the exposition text.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=True)
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0.0)
        registry = self.registry
        self._counters = {
            name: Counter(f"{PREFIX}_{name}", help_text, registry=registry)
            for name, help_text in COUNTERS.items()
        }
        self._gauges = {
            name: Gauge(f"{PREFIX}_{name}", help_text, registry=registry)
            for name, help_text in GAUGES.items()
        }
        self._requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests by endpoint (route template) and status code.",
            ("endpoint", "code"),
            registry=registry,
        )
        self._latency = Histogram(
            f"{PREFIX}_request_latency_seconds",
            "Seconds from a request's arrival to its last byte.",
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self._first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated text.",
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self._inter_token = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Seconds between consecutive generated tokens of one row.",
            registry=registry,
            buckets=INTER_TOKEN_BUCKETS,
        )
        self._batch_rows = Histogram(
            f"{PREFIX}_batch_rows",
            "Rows (prompts x n) per batch the worker ran.",
            registry=registry,
            buckets=BATCH_BUCKETS,
        )

    def request(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        """One answered request; ``endpoint`` must be a route template or "unmatched"."""
        self._requests.labels(endpoint=endpoint, code=str(status)).inc()
        if seconds is not None:
            self._latency.observe(seconds)

    def time_to_first_token(self, seconds: float) -> None:
        self._first_token.observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self._inter_token.observe(seconds)

    def add(self, **values: float) -> None:
        """Add to the named counters. Names come from the server's code, never a client; one
        not in COUNTERS gets its counter on first use (its help text then says only that)."""
        with self._lock:
            for name, value in values.items():
                counter = self._counters.get(name)
                if counter is None:
                    counter = Counter(
                        f"{PREFIX}_{name}", f"{name} (worker counter).", registry=self.registry
                    )
                    self._counters[name] = counter
                    self.counters[name] = 0.0
                self.counters[name] += value
                counter.inc(value)

    def batch(self, rows: int) -> None:
        self._batch_rows.observe(rows)
        self.add(batches=1)

    def spec_decode(self, drafts: int, draft_tokens: int, accepted_tokens: int) -> None:
        """Speculative decoding's proposals, their tokens and how many were accepted (vLLM's
        ``spec_decode_num_*`` counters)."""
        self.add(
            spec_decode_num_drafts=drafts,
            spec_decode_num_draft_tokens=draft_tokens,
            spec_decode_num_accepted_tokens=accepted_tokens,
        )

    def render(self, queued: int, running: int) -> str:
        """The exposition text, with the gauges set from the totals at this moment."""
        with self._lock:
            counted = self.counters["counted_flops"]
            dense = self.counters["dense_flops"]
            tokens = self.counters["processed_tokens"]
            values = {
                "flop_fraction_of_dense": counted / dense if dense else 1.0,
                "counted_flops_per_token": counted / tokens if tokens else 0.0,
                "dense_flops_per_token": dense / tokens if tokens else 0.0,
                "queued_requests": queued,
                "running_requests": running,
            }
            for name, value in values.items():
                self._gauges[name].set(value)
            return generate_latest(self.registry).decode("utf-8")
