"""FLOPs counted from the shapes that actually executed.

The engine reports, per layer call, how many token rows went through the layer's matmuls and
how many (query, key) pairs attention really scored; the counter turns those into FLOPs
(2 per multiply-accumulate). Elementwise work (norms, activations, RoPE, softmax) is not
counted, as in the usual analytical formulas. Padding rows that ran are counted: they executed.
Masked attention entries that a kernel may touch are counted neither as work nor as savings.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from dataclasses import dataclass, field

from quicksilver.models.config import ModelConfig


def layer_matmul_flops_per_token(config: ModelConfig) -> int:
    """QKV, attention output and MLP matmuls of one layer, for one token."""
    d = config.hidden_size
    mlp_in = config.intermediate_size * (2 if config.gated_mlp else 1)
    macs = d * (config.q_dim + 2 * config.kv_dim) + config.q_dim * d
    macs += d * mlp_in + config.intermediate_size * d
    return 2 * macs


def attention_flops_per_pair(config: ModelConfig) -> int:
    """Scores (q.k) and weighted sum (p.v) for one (query, key) pair, all heads."""
    return 4 * config.n_heads * config.head_dim


def head_flops_per_token(config: ModelConfig) -> int:
    """LM head (and OPT's output projection) for one token."""
    flops = 2 * config.embed_dim * config.vocab_size
    if config.word_embed_proj_dim:
        flops += 2 * config.hidden_size * config.word_embed_proj_dim
    return flops


def embed_flops_per_token(config: ModelConfig) -> int:
    """OPT's input projection; a plain embedding lookup is not a FLOP."""
    return 2 * config.hidden_size * config.word_embed_proj_dim if config.word_embed_proj_dim else 0


def causal_pairs(n_tokens: int, sliding_window: int | None = None) -> int:
    """(query, key) pairs of causal attention over ``n_tokens`` from an empty cache; with a
    sliding window each query reads at most ``sliding_window`` keys."""
    window = min(sliding_window or n_tokens, n_tokens)
    return window * (window + 1) // 2 + (n_tokens - window) * window


def dense_flops(config: ModelConfig, n_tokens: int, attended_pairs: int, head_tokens: int) -> int:
    """The analytical dense cost of a workload: what a model running every token through
    every layer would spend."""
    return (
        n_tokens * (config.n_layers * layer_matmul_flops_per_token(config))
        + n_tokens * embed_flops_per_token(config)
        + config.n_layers * attended_pairs * attention_flops_per_pair(config)
        + head_tokens * head_flops_per_token(config)
    )


def kv_projection_flops_per_token(config: ModelConfig) -> int:
    """K and V projections of one layer for one token: what a halted token costs when its
    K/V are propagated from its frozen state."""
    return 2 * config.hidden_size * 2 * config.kv_dim


def lens_check_flops(config: ModelConfig, n_tokens: int, vocab_rows: int) -> int:
    """A logit-lens signal: the head product over ``vocab_rows`` ids (and OPT's output
    projection) for ``n_tokens`` tokens."""
    flops = n_tokens * 2 * config.embed_dim * vocab_rows
    if config.word_embed_proj_dim:
        flops += n_tokens * 2 * config.hidden_size * config.word_embed_proj_dim
    return flops


def exit_head_flops(config: ModelConfig, n_tokens: int) -> int:
    """An exit head (``quicksilver.adapt.exits``: an affine d x d map) on ``n_tokens``
    states, paid on top of the lens product whenever fitted heads feed the lens."""
    return n_tokens * (2 * config.hidden_size + 1) * config.hidden_size


def drift_check_flops(hidden: int, n_tokens: int, relative: bool) -> int:
    """||h_l - h_(l-1)|| per token: difference, square, sum (3d); dividing by ||h_l|| adds
    its square and sum (2d)."""
    return n_tokens * hidden * (5 if relative else 3)


def fusion_check_flops(hidden: int, window: int, n_tokens: int) -> int:
    """Fusion distances over one row's ``n_tokens`` active tokens: one distance (difference,
    square, sum) per token and each of its candidates. A token has at most ``n_tokens - 1``
    tokens before it, so a configured ``window`` wider than the row is capped to what is
    there (the first tokens' missing candidates are computed and masked: they count); a row
    of one token has no candidate and computes nothing."""
    candidates = min(window, n_tokens - 1) if n_tokens > 1 else 0
    return 3 * hidden * candidates * n_tokens


def decode_flops_per_token(config: ModelConfig, layers: float) -> float:
    """Matmul FLOPs of one generated token that runs ``layers`` layers: those layers, the
    embedding projection (if any) and the LM head, which always run. Attention over the
    context is left out (small at short contexts, and shrinking with the layers anyway)."""
    fixed = head_flops_per_token(config) + embed_flops_per_token(config)
    return layers * layer_matmul_flops_per_token(config) + fixed


def kv_cache_bytes(config: ModelConfig, batch: int, length: int, element_size: int) -> int:
    """Memory of a KV cache: keys and values of every layer, row and slot."""
    return 2 * config.n_layers * batch * config.n_kv_heads * length * config.head_dim * element_size


def kv_weight_bytes(config: ModelConfig, bytes_per_weight: float) -> int:
    """The K/V rows of one layer's QKV weight: what a propagated halted token reads."""
    return int(2 * config.kv_dim * config.hidden_size * bytes_per_weight)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, falling back to what platform knows (timings belong
    to one kind of machine: reports and cached measurements name it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where unknown): what an allocation may use."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


WIDTH_KEYS = {
    0: "weight_bytes_full",
    8: "weight_bytes_int8",
    4: "weight_bytes_int4",
    2: "weight_bytes_int2",
}


@dataclass
class FlopCounter:
    """FLOPs by kind, plus the layer-weight bytes read per weight width.

    ``checks`` is the cost of the signals adaptive policies compute to decide (drift norms,
    logit-lens entropies, fusion distances); it is part of ``total``.
    """

    config: ModelConfig
    matmul: int = 0
    attention: int = 0
    head: int = 0
    checks: int = 0
    per_layer: list[int] = field(default_factory=list)
    layer_tokens: int = 0  # token rows through layers, summed over layers
    head_tokens: int = 0
    kv_only_tokens: int = 0  # halted tokens whose K/V were still projected, summed over layers
    weight_bytes: dict[int, int] = field(default_factory=dict)  # width (0 = full) -> bytes
    # What the dense model would have spent on the same forwards (same tokens, same logits):
    # counted by the runner beside the real work, so no caller re-simulates a run to compare.
    dense: int = 0

    def __post_init__(self) -> None:
        if not self.per_layer:
            self.per_layer = [0] * self.config.n_layers

    def add_embedding(self, n_tokens: int) -> None:
        self.matmul += n_tokens * embed_flops_per_token(self.config)

    def add_layer(self, layer: int, n_tokens: int, attended_pairs: int) -> None:
        matmul = n_tokens * layer_matmul_flops_per_token(self.config)
        attention = attended_pairs * attention_flops_per_pair(self.config)
        self.matmul += matmul
        self.attention += attention
        self.per_layer[layer] += matmul + attention
        self.layer_tokens += n_tokens

    def add_every_layer(self, n_tokens: int, attended_pairs: int) -> None:
        """``add_layer`` for every layer with the same rows and pairs (a dense forward), in one
        call: a compiled decode step costs ~3 ms, and thirty calls here were ~1% of it."""
        matmul = n_tokens * layer_matmul_flops_per_token(self.config)
        attention = attended_pairs * attention_flops_per_pair(self.config)
        layers = self.config.n_layers
        self.matmul += layers * matmul
        self.attention += layers * attention
        self.per_layer = [flops + matmul + attention for flops in self.per_layer]
        self.layer_tokens += layers * n_tokens

    def add_kv_projection(self, layer: int, n_tokens: int) -> None:
        flops = n_tokens * kv_projection_flops_per_token(self.config)
        self.matmul += flops
        self.per_layer[layer] += flops
        self.kv_only_tokens += n_tokens

    def add_checks(self, flops: int) -> None:
        self.checks += flops

    def add_weight_read(self, bits: int, n_bytes: int) -> None:
        self.weight_bytes[bits] = self.weight_bytes.get(bits, 0) + n_bytes

    def add_head(self, n_tokens: int) -> None:
        self.head += n_tokens * head_flops_per_token(self.config)
        self.head_tokens += n_tokens

    def add_dense_equivalent(self, n_tokens: int, attended_pairs: int, head_tokens: int) -> None:
        """The dense cost of a forward of ``n_tokens`` whose queries may read
        ``attended_pairs`` (query, key) pairs in every layer, with ``head_tokens`` logits."""
        self.dense += dense_flops(self.config, n_tokens, attended_pairs, head_tokens)

    @property
    def total(self) -> int:
        return self.matmul + self.attention + self.head + self.checks

    def reset(self) -> None:
        self.matmul = self.attention = self.head = self.checks = 0
        self.layer_tokens = self.head_tokens = self.kv_only_tokens = 0
        self.dense = 0
        self.per_layer = [0] * self.config.n_layers
        self.weight_bytes = {}

    def summary(self) -> dict[str, int]:
        out = {
            "total": self.total,
            "matmul": self.matmul,
            "attention": self.attention,
            "head": self.head,
            "checks": self.checks,
            "layer_tokens": self.layer_tokens,
            "head_tokens": self.head_tokens,
            "kv_only_tokens": self.kv_only_tokens,
            "dense": self.dense,
        }
        for bits, key in WIDTH_KEYS.items():
            out[key] = self.weight_bytes.get(bits, 0)
        return out

    def since(self, earlier: dict[str, int]) -> dict[str, int]:
        """What was counted after ``earlier`` (a ``summary()``): one run's share of a counter
        that an engine keeps across runs."""
        return {key: value - earlier[key] for key, value in self.summary().items()}


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Meter:
    """Wall-clock time and peak resident memory of a block of work.

    A background thread samples RSS every ``interval`` seconds, so short spikes between samples
    can be missed; the peak is at least the RSS at entry and exit. ``peak_rss_bytes`` is the
    process's peak during the block (weights included), ``peak_extra_bytes`` what the block
    added on top of what was resident when it started.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.seconds = 0.0
        self.start_rss_bytes = 0
        self.peak_rss_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peak_extra_bytes(self) -> int:
        return max(0, self.peak_rss_bytes - self.start_rss_bytes)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss_bytes = max(self.peak_rss_bytes, current_rss_bytes())

    def __enter__(self) -> Meter:
        self.start_rss_bytes = self.peak_rss_bytes = current_rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss_bytes = max(self.peak_rss_bytes, current_rss_bytes())
