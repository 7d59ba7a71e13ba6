"""Property-based: the FLOPs the engine counts equal the FLOPs that executed, for random
policies (every mechanism's knobs, alone and combined, windows wider than the text), random
text lengths and batch sizes, on the tiny models of every family.

The independent count comes from what ran, not from the accounting formulas:
- matmuls: a TorchDispatchMode sees every aten matrix product (``linear``, ``mm``, ``addmm``,
  ``bmm``, ``matmul``, oneDNN's pre-packed linear) and sums 2 * M * K * N of the shapes it
  ran on; any other matrix-like op fails the test rather than go unpriced. This covers the
  layers' linears, halted tokens' K/V projections, OPT's projections, the LM head and the
  logit-lens products of the checks. Compared exactly.
- Matryoshka's int4 planes: a width-8 product is two int4 kernel calls (hi and lo planes) for
  one logical [M, K] x [K, N] product; the wrapper around ``quant.planes_linear`` counts that
  product once, from the shapes it was called with (the second call is the emulation's price,
  which the counter reports as bytes read, not FLOPs).
- attention: the kernels compute masked entries too, which the counter deliberately counts
  neither as work nor as savings; so the pairs are read from the mask (or causal flag) each
  attention call was given, times 4 * heads * head_dim of the query it was given. Exact.
- elementwise signals (drift norms, fusion distances) are not matmuls, and elementwise work has
  no single FLOP convention; they are observed from the tensors the check built and priced by
  the counter's stated convention: a drift costs 1 per element of h_l - h_(l-1) plus 2 per
  element of each norm's input; a fusion distance costs 3 per element of the candidate states
  gathered (difference, square, sum). Exact under that convention. Norms, softmax, RoPE and
  activations are not counted by either side.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from tiny_models import TINY_MODELS, VOCAB, save_tiny
from torch.utils._python_dispatch import TorchDispatchMode

from quicksilver import quant
from quicksilver.accounting import lens_check_flops
from quicksilver.models import loading
from quicksilver.policies import Policy, PolicyConfigError
from quicksilver.policies import fusion as fusion_module
from quicksilver.policies.base import LayerView
from quicksilver.policies.halting import TokenHalting
from quicksilver.runtime import attention as attention_module
from quicksilver.runtime.engine import Engine
from quicksilver.runtime.generate import generate

# One model per family shape: learned positions (GPT-2), OPT with its projections, Llama with
# GQA and three layers, Mistral with a sliding window shorter than most drawn texts.
MODELS = ("gpt2", "opt_projected", "llama_gqa", "mistral_window")

aten = torch.ops.aten


class ExecutedFlops(TorchDispatchMode):
    """Counts the matmuls that run, and the elements of the signals the checks build, split
    by the region (attention, planes, lens, drift, fusion) the wrappers below mark."""

    def __init__(self) -> None:
        super().__init__()
        self.matmul = 0
        self.attention = 0
        self.elementwise = 0
        self.regions: list[str] = []
        self.unknown: list[str] = []

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        self.regions.append(name)
        try:
            yield
        finally:
            self.regions.pop()

    @property
    def inside(self) -> str | None:
        return self.regions[-1] if self.regions else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        where = self.inside
        if where in ("attention", "planes"):
            return out  # counted once by the wrapper, from the call's own inputs
        packet = func.overloadpacket
        if packet in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm):
            a, b = (args[0], args[1]) if packet in (aten.mm, aten.bmm) else (args[1], args[2])
            batch = a.shape[0] if a.dim() == 3 else 1
            self.matmul += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        elif packet is aten.linear or "_linear_pointwise" in str(packet):
            # x [..., K] times a [N, K] weight (plain or oneDNN pre-packed): out [..., N]
            self.matmul += 2 * out.numel() * args[0].shape[-1]
        elif packet is aten.matmul:
            self.matmul += 2 * out.numel() * args[0].shape[-1]
        elif any(word in str(packet) for word in ("mm", "linear", "matmul", "dot", "conv")):
            self.unknown.append(str(packet))
        elif where == "fusion" and packet is aten.index:
            self.elementwise += 3 * out.numel()  # the candidate states of every distance
        elif where == "drift" and packet is aten.sub:
            self.elementwise += out.numel()
        elif where == "drift" and packet is aten.linalg_vector_norm:
            self.elementwise += 2 * args[0].numel()
        return out


def attention_pairs_from_mask(
    queries: int, keys: int, batch: int, mask: torch.Tensor | None, causal: bool
) -> int:
    """(query, key) pairs an attention call was allowed to score, per its inputs."""
    if mask is None:
        if causal:  # top-left aligned, as SDPA's is_causal
            return batch * sum(min(i + 1, keys) for i in range(queries))
        return batch * queries * keys
    allowed = mask if mask.dtype == torch.bool else torch.isfinite(mask)
    return int(allowed.expand(batch, 1, queries, keys).sum())


@contextlib.contextmanager
def observed(monkeypatch: pytest.MonkeyPatch) -> Iterator[ExecutedFlops]:
    """Run the block under the dispatch counter with the region wrappers installed."""
    mode = ExecutedFlops()

    def wrap(owner: Any, name: str, region: str, before: Callable[..., None] | None = None):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if before is not None:
                before(*args, **kwargs)
            with mode.region(region):
                return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **_):  # noqa: ANN001
        batch, heads, queries, head_dim = q.shape
        pairs = attention_pairs_from_mask(queries, k.shape[-2], batch, attn_mask, is_causal)
        mode.attention += pairs * 4 * heads * head_dim

    def grouped(q, keys, values, mask, bias=None):  # noqa: ANN001
        n, _, heads, head_dim = q.shape
        pairs = attention_pairs_from_mask(1, keys.shape[-2], n, mask, causal=False)
        mode.attention += pairs * 4 * heads * head_dim

    def planes(x, planes_, bits, bias=None):  # noqa: ANN001
        mode.matmul += 2 * (x.numel() // x.shape[-1]) * planes_.in_features * planes_.out_features

    wrap(F, "scaled_dot_product_attention", "attention", sdpa)
    wrap(attention_module, "grouped_one_query", "attention", grouped)
    wrap(quant, "planes_linear", "planes", planes)
    wrap(fusion_module, "distance_to_previous", "fusion")
    wrap(TokenHalting, "after_layer", "drift")
    wrap(LayerView, "lens_entropy", "lens")
    with mode:
        yield mode


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Engine]:
    root: Path = tmp_path_factory.mktemp("tiny")
    out = {}
    for name in MODELS:
        save_tiny(TINY_MODELS[name](), root / name)
        out[name] = Engine(loading.load(str(root / name), "float32").model)
    return out


THRESHOLDS = st.sampled_from([0.0, 0.05, 0.3, 1.0, 5.0, 1e9])
WINDOWS = st.sampled_from([1, 2, 3, 7, 64, 1000])  # 64 and 1000: wider than any drawn text
LENS = st.sampled_from([None, 2, 17, 100_000])  # 100_000: a shortlist wider than the vocabulary


@st.composite
def policies(draw, n_layers: int) -> dict[str, Any]:
    layer = st.integers(0, n_layers - 2)
    config: dict[str, Any] = {}
    if draw(st.booleans()):
        signals = draw(st.sets(st.sampled_from(["drift", "relative_drift", "entropy_bits"])))
        config["halting"] = {
            **{key: draw(THRESHOLDS) for key in signals},
            "lens_vocab": draw(LENS),
            "patience": draw(st.integers(1, 2)),
            "min_layer": draw(layer),
            "interval": draw(st.integers(1, 2)),
        }
    if draw(st.booleans()):
        config["kv_skip"] = {"treatment": draw(st.sampled_from(["propagate", "skip", "zero"]))}
    if draw(st.booleans()):
        config["fusion"] = {
            "threshold": draw(THRESHOLDS),
            "metric": draw(st.sampled_from(["l2", "relative_l2", "cosine"])),
            "window": draw(WINDOWS),
            "max_group": draw(st.integers(2, 4)),
            "start_layer": draw(layer),
            "interval": draw(st.integers(1, 2)),
            "size_weighted": draw(st.booleans()),
        }
    if draw(st.booleans()):
        if draw(st.booleans()):
            widths = {"fixed_bits": draw(st.sampled_from([8, 4, 2]))}
        else:
            low = draw(st.sampled_from([0.0, 1.0, 4.0]))
            widths = {"entropy_low": low, "entropy_high": low + draw(st.sampled_from([0.0, 2.0]))}
        config["matryoshka"] = {
            **widths,
            "decision_layer": draw(layer),
            "lens_vocab": draw(LENS),
            "group_size": draw(st.sampled_from([None, 32])),
            "kernel": draw(st.sampled_from(["auto", "planes", "simulated"])),
        }
    if draw(st.booleans()):
        warmup = draw(st.integers(0, 1))
        top = draw(st.integers(warmup + 1, n_layers))
        config["skipdecode"] = {
            "max_layers": top,
            "min_layers": draw(st.integers(warmup + 1, top)),
            "warmup_layers": warmup,
            "decay_length": draw(st.integers(1, 4)),
            "power": draw(st.sampled_from([0.5, 1.0, 2.0])),
        }
    return config


@st.composite
def workloads(draw) -> tuple[str, dict[str, Any], list[int], int, bool, bool]:
    name = draw(st.sampled_from(MODELS))
    n_layers = 3 if name == "llama_gqa" else 2
    config = draw(policies(n_layers))
    lengths = draw(st.lists(st.integers(1, 40), min_size=1, max_size=3))
    new_tokens = draw(st.integers(0, 3))  # 0: one teacher-forced forward with every logit
    return name, config, lengths, new_tokens, draw(st.booleans()), draw(st.integers(0, 3))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(workload=workloads())
def test_counted_flops_equal_executed_flops(
    engines: dict[str, Engine], monkeypatch: pytest.MonkeyPatch, workload: tuple
) -> None:
    name, config, lengths, new_tokens, fast, seed = workload
    engine = engines[name]
    try:
        engine.set_policy(Policy.from_config(config))
    except PolicyConfigError:
        assume(False)
    event(f"{name}: {' + '.join(config) or 'dense'}")
    engine.model.set_fast_path(fast)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    counter = engine.counter
    counter.reset()
    with monkeypatch.context() as patch, observed(patch) as executed:
        if new_tokens:
            generate(engine, prompts, max_new_tokens=new_tokens, ignore_eos=True)
        else:
            tokens = torch.tensor([prompts[0]])
            cache = engine.new_cache(1, len(prompts[0]))
            engine.forward(tokens, cache, logits_at="all")
    event("elementwise checks ran" if executed.elementwise else "no elementwise check")
    event("halted tokens projected K/V" if counter.kv_only_tokens else "no K/V-only token")
    assert not executed.unknown, f"matmul-like ops the counter cannot price: {executed.unknown}"
    counted_products = counter.matmul + counter.head + counter.checks
    assert counted_products == executed.matmul + executed.elementwise, (
        f"{config}: counted {counted_products} matmul + head + check FLOPs, executed "
        f"{executed.matmul} in matmuls + {executed.elementwise} in elementwise checks"
    )
    assert counter.attention == executed.attention, config
    assert counter.total == executed.matmul + executed.elementwise + executed.attention
    assert math.isfinite(counter.total)


def test_a_fusion_window_wider_than_the_text_costs_what_the_text_has(
    engines: dict[str, Engine],
) -> None:
    """20 tokens have at most 19 candidates each, however wide the configured window: a
    window of 1000 costs what a window of 19 costs (it was counted as 1000 candidates)."""
    engine = engines["llama_gqa"]  # 3 layers: fusion decides after layers 0 and 1
    hidden = engine.config.hidden_size
    costs = {}
    for window in (19, 1000):
        config = {"fusion": {"threshold": 0.0, "window": window, "start_layer": 0}}
        engine.set_policy(Policy.from_config(config))  # threshold 0: nothing folds
        engine.counter.reset()
        engine.forward(torch.arange(3, 23).view(1, -1), engine.new_cache(1, 20), "all")
        costs[window] = engine.counter.checks
    assert costs[1000] == costs[19] == 2 * 3 * hidden * 19 * 20


def test_one_logit_lens_for_two_mechanisms_reading_the_same_rows(
    engines: dict[str, Engine],
) -> None:
    """A shortlist at least as long as the vocabulary is the full check: halting and
    Matryoshka asking at the same layer share one head product, run and counted once."""
    engine = engines["gpt2"]  # 2 layers: both decide after layer 0 only
    config = {
        "halting": {"entropy_bits": 0.0, "lens_vocab": 10 * VOCAB, "min_layer": 0},
        "matryoshka": {"entropy_low": 0.0, "entropy_high": 0.0, "decision_layer": 0},
    }
    engine.set_policy(Policy.from_config(config))
    engine.counter.reset()
    engine.forward(torch.arange(3, 15).view(1, -1), engine.new_cache(1, 12), "all")
    assert engine.counter.checks == lens_check_flops(engine.config, 12, VOCAB)
