"""Our int4 x int8 kernel (quicksilver/kernels): its layout helpers, its arithmetic against a
float64 oracle of the same roundings, and the property verified decoding rests on: a row's
output is bit for bit the same whatever else is in the call (rows, row chunks, threads,
instruction set, band of outputs)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import pytest
import torch
from test_accounting import random_model
from test_formats import FITS

from quicksilver import kernels
from quicksilver.models import formats
from quicksilver.models.formats import Int4Linear, WeightFormat, convert_model, quantize_int4
from quicksilver.runtime.engine import Engine
from quicksilver.runtime.generate import generate
from quicksilver.runtime.speculative import SpeculativeConfig

needs_kernel = pytest.mark.skipif(
    not kernels.available(),
    reason=f"our int4 kernel does not run here: {kernels.unavailable_reason()}",
)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch (and our kernels' ATen pool) on one thread, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def codes_for(out_features: int, in_features: int, group: int, seed: int):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    codes = quantize_int4(weight, group)
    return codes, codes.zeros - 8 * codes.scales


def packed_for(out_features: int, in_features: int, group: int = 32, seed: int = 0):
    codes, mins = codes_for(out_features, in_features, group, seed)
    return codes, kernels.pack(codes.codes, codes.scales, mins, group)


# --- layouts (pure functions, no build needed) ----------------------------------------------


@pytest.mark.parametrize("group", [32, 64, 128])
def test_pack_round_trips_codes_and_weights(group: int) -> None:
    codes, packed = packed_for(48, 256, group)
    assert packed.shape == (3, 8, 320) and packed.dtype == torch.uint8
    unpacked, scales, _ = kernels.unpack(packed)
    assert torch.equal(unpacked, codes.codes)
    per_block = group // 32
    want_scales = codes.scales.half().float().repeat_interleave(per_block, 1)
    assert torch.equal(scales, want_scales)  # stored as float16, as GGUF stores them
    # The weights move by the float16 rounding of scale and min only (2^-11 relative).
    bound = 2**-11 * (15 * codes.scales.abs() + (codes.zeros - 8 * codes.scales).abs()).max()
    error = (kernels.dequantize(packed) - codes.dequantize()).abs().max()
    assert 0 < float(error) <= float(bound)


def test_activations_round_to_int8_per_block_of_32() -> None:
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    x[1, :32] = 0  # a block of zeros: scale 0, codes 0
    q, scale = kernels.quantize_activations(x)
    assert scale.shape == (3, 2) and scale[1, 0] == 0
    assert q.abs().max() == 127 and torch.equal(q, q.round())
    restored = (q.view(3, 2, 32) * scale.unsqueeze(-1)).view(3, 64)
    assert float((restored - x).abs().max()) <= float(scale.max()) / 2 + 1e-6


# --- the kernel --------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k", "group"), [(16, 32, 32), (48, 256, 64), (64, 384, 128)])
def test_kernel_equals_its_oracle(n: int, k: int, group: int, dtype: torch.dtype) -> None:
    _, packed = packed_for(n, k, group, seed=n + k)
    x = torch.randn(11, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = kernels.linear(x, packed)
    want = kernels.reference_linear(x.float(), packed)
    assert got.dtype == dtype and got.shape == (11, n)
    scale = float(want.abs().max())
    # fp32: summation order only; bf16: the output rounded to 8 bits of mantissa.
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8
    assert float((got.float() - want).abs().max()) <= tolerance * scale


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_is_the_same_whatever_else_is_in_the_call(dtype: torch.dtype) -> None:
    """Alone, among 20 rows (three chunks), on one thread or two, as a band of outputs, and
    on either instruction set: the same bits."""
    _, packed = packed_for(64, 192, seed=3)
    x = torch.randn(20, 192, generator=torch.Generator().manual_seed(4)).to(dtype)
    whole = kernels.linear(x, packed)
    for row in range(20):
        alone = kernels.linear(x[row : row + 1].contiguous(), packed)
        assert torch.equal(alone, whole[row : row + 1]), row
    assert torch.equal(kernels.linear(x, packed, slice(1, 3)), whole[:, 16:48])
    with one_thread():
        assert torch.equal(kernels.linear(x, packed), whole)
    if kernels.best_isa() == "avx512":
        assert torch.equal(kernels.linear(x, packed, isa="avx2"), whole)


@needs_kernel
def test_zero_rows_and_bad_shapes() -> None:
    _, packed = packed_for(32, 64)
    assert torch.equal(kernels.linear(torch.zeros(2, 64), packed), torch.zeros(2, 32))
    assert kernels.linear(torch.zeros(0, 64), packed).shape == (0, 32)
    with pytest.raises(RuntimeError, match="x has 96 inputs, the weight 64"):
        kernels.linear(torch.zeros(2, 96), packed)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.linear(torch.zeros(2, 64, dtype=torch.float16), packed)


@needs_kernel
def test_int8_kernel_equals_its_oracle_and_keeps_rows_apart() -> None:
    """int8 weights with per-channel scales: the oracle's numbers, and a row's bits do not
    depend on the call (rows, instruction set), as for int4."""
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(-127, 128, (48, 96), dtype=torch.int8, generator=gen)
    codes[0, :32] = -128  # the extreme code, through both instruction sets
    packed, scales = kernels.pack8(codes), torch.rand(48, generator=gen) + 0.01
    assert torch.equal(kernels.unpack8(packed), codes)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(19, 96, generator=gen).to(dtype)
        x[3] = 0
        got = kernels.linear8(x, packed, scales)
        want = kernels.reference_linear(x.float(), packed, scales)
        tolerance = 1e-5 if dtype == torch.float32 else 2**-8
        assert float((got.float() - want).abs().max()) <= tolerance * float(want.abs().max())
        assert torch.equal(got[3], torch.zeros(48, dtype=dtype))
        for row in (0, 7, 8, 18):
            alone = kernels.linear8(x[row : row + 1].contiguous(), packed, scales)
            assert torch.equal(alone, got[row : row + 1])
        assert torch.equal(kernels.linear8(x, packed, scales, slice(2, 3)), got[:, 32:48])
        if kernels.best_isa() == "avx512":
            assert torch.equal(kernels.linear8(x, packed, scales, isa="avx2"), got)


# --- through a model ---------------------------------------------------------------------


@needs_kernel
def test_an_int4_model_runs_our_kernels_when_asked(monkeypatch) -> None:
    """With QUICKSILVER_KERNELS=ours every block product and the int8 head run our kernels,
    in fp32 and bf16, and generation runs through them (one-token steps and n-gram verify
    forwards alike)."""
    monkeypatch.setenv("QUICKSILVER_KERNELS", "ours")
    for dtype in (torch.float32, torch.bfloat16):
        model = random_model(dataclasses.replace(FITS, n_layers=3), fast=False).to(dtype)
        convert_model(model, WeightFormat("int4"))
        linears = [m for m in model.modules() if isinstance(m, Int4Linear)]
        assert linears and all(m.native for m in linears)
        formats.kernel_log.clear()
        prompt = [[5, 9, 13, 2, 7, 5, 9, 13, 2, 7, 5, 9, 13]]
        config = SpeculativeConfig(method="ngram", num_tokens=4)
        result = generate(Engine(model), prompt, 24, ignore_eos=True, speculative=config)
        assert len(result.tokens[0]) == 24
        assert formats.kernel_log["int4-q8"] >= 3 * 4 * (1 + result.decode_steps)
        assert formats.kernel_log["int4-dequant"] == 0


@needs_kernel
def test_compiled_int4_decode_calls_our_kernel_and_equals_eager(monkeypatch) -> None:
    """The compiled one-row decode step traces our op (its shape function is registered) and
    gives the eager step's tokens."""
    monkeypatch.setenv("QUICKSILVER_KERNELS", "ours")
    model = random_model(dataclasses.replace(FITS, n_layers=2), fast=False).to(torch.bfloat16)
    convert_model(model, WeightFormat("int4"))
    prompt = [[5, 9, 13, 2, 7, 11]]
    eager = generate(Engine(model), prompt, 12, ignore_eos=True)
    compiled = generate(Engine(model, compile=True), prompt, 12, ignore_eos=True)
    assert compiled.compile_seconds > 0 and compiled.tokens == eager.tokens


# --- bf16 weights (AVX-512 BF16) ------------------------------------------------------------

needs_bf16_kernel = pytest.mark.skipif(
    not kernels.bf16_available(), reason="our bf16 kernel does not run here (no AVX-512 BF16)"
)


def test_pack_bf16_puts_each_pair_in_its_lane() -> None:
    weight = torch.arange(32 * 64, dtype=torch.float32).view(32, 64).bfloat16()
    packed = kernels.pack_bf16(weight)
    assert packed.shape == (2, 2, 512)
    # tile 1, block 1, vector j = 3, lane n = 5: w(16 + 5, 32 + 6) and w(21, 39)
    vector = packed[1, 1].view(16, 16, 2)[3]
    assert torch.equal(vector[5], weight[21, 38:40])


@needs_bf16_kernel
def test_bf16_kernel_equals_float_products_and_keeps_rows_apart() -> None:
    """float32 sums of bf16 products, rounded once to bf16; each row's bits whatever else is
    in the call (rows are multiplied four at a time) or the threads."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(48, 96, generator=gen).bfloat16()
    x = torch.randn(7, 96, generator=gen).bfloat16()
    packed = kernels.pack_bf16(weight)
    got = kernels.linear_bf16(x, packed)
    want = x.double() @ weight.double().t()
    assert got.dtype == torch.bfloat16 and got.shape == (7, 48)
    assert float((got.double() - want).abs().max()) <= float(want.abs().max()) * 2**-8
    for row in range(7):
        assert torch.equal(
            kernels.linear_bf16(x[row : row + 1].contiguous(), packed), got[row : row + 1]
        )
    with one_thread():
        assert torch.equal(kernels.linear_bf16(x, packed), got)


@needs_bf16_kernel
def test_a_bf16_model_runs_our_kernel_when_asked_eager_and_compiled(monkeypatch) -> None:
    """With QUICKSILVER_KERNELS=ours a bf16 model's products (those whose shapes tile) run
    our kernel in decode steps, eager and compiled, close to oneDNN's products; the compiled
    step gives the eager step's tokens. Without it nothing is packed for it."""
    model = random_model(dataclasses.replace(FITS, n_layers=2), fast=True).to(torch.bfloat16)
    model.set_fast_path(True)
    assert all(linear.packed_ours is None for linear in model.linears())
    prompt = [[5, 9, 13, 2, 7, 11]]
    onednn = Engine(model)
    cache = onednn.new_cache(1, 16)
    onednn.forward(torch.tensor(prompt), cache)
    reference = onednn.forward(torch.tensor([[3]]), cache)
    monkeypatch.setenv("QUICKSILVER_KERNELS", "ours")
    model.set_fast_path(True)
    assert model.blocks[0].attn.qkv.packed_ours is not None
    calls = []
    real = kernels.linear_bf16
    monkeypatch.setattr(kernels, "linear_bf16", lambda x, w: calls.append(1) or real(x, w))
    engine = Engine(model)
    cache = engine.new_cache(1, 16)
    engine.forward(torch.tensor(prompt), cache)  # a prefill of 6 rows: ours too (<= 16)
    ours = engine.forward(torch.tensor([[3]]), cache)
    assert len(calls) == 2 * 2 * 4
    torch.testing.assert_close(ours.float(), reference.float(), atol=0.05, rtol=0.05)
    eager = generate(Engine(model), prompt, 12, ignore_eos=True)
    compiled = generate(Engine(model, compile=True), prompt, 12, ignore_eos=True)
    assert compiled.compile_seconds > 0 and compiled.tokens == eager.tokens


# --- attention computed query by query ---------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_each_equals_softmax_attention_and_keeps_queries_apart(dtype) -> None:
    """The oracle's numbers; a query's bits do not depend on the other queries, on keys it
    does not read, on the threads, or on how the heads sharing a KV head are grouped into
    work items (all three together here, one at a time for a single query; GQA: 6 query
    heads over 2 KV heads)."""
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 5, 6, 64, generator=gen)
    keys = torch.randn(2, 2, 40, 64, generator=gen).to(dtype)
    values = torch.randn(2, 2, 40, 64, generator=gen).to(dtype)
    reads = torch.rand(2, 5, 40, generator=gen) > 0.3
    reads[..., 33:] = False
    got = kernels.attend_each(q, keys, values, reads, 64**-0.5)
    scores = (
        torch.einsum("bshd,bhtd->bsht", q.double(), keys.double().repeat_interleave(3, 1))
        * 64**-0.5
    )
    probs = scores.masked_fill(~reads[:, :, None], float("-inf")).softmax(-1)
    want = torch.einsum("bsht,bhtd->bshd", probs, values.double().repeat_interleave(3, 1))
    assert float((got.double() - want).abs().max()) < 1e-5
    alone = kernels.attend_each(
        q[:, 3:4].contiguous(), keys, values, reads[:, 3:4].contiguous(), 0.125
    )
    assert torch.equal(alone, got[:, 3:4])
    shorter = kernels.attend_each(
        q, keys[:, :, :33], values[:, :, :33], reads[..., :33].contiguous(), 64**-0.5
    )
    assert torch.equal(shorter, got)
    with one_thread():
        single = kernels.attend_each(q, keys, values, reads, 64**-0.5)
    assert torch.equal(single, got)


@needs_kernel
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_with_our_kernels_a_forward_of_k_tokens_equals_k_steps_bit_for_bit(
    monkeypatch, dtype, compiled
) -> None:
    """What verified decoding rests on: with our kernels (activations rounded to int8) the
    engine attends query by query, so the logits of a k-token forward are those of k
    one-token steps, exactly, in fp32 and bf16, for a batch of rows; eager, and compiled
    (the verify graph and the decode-step graph are two graphs that must agree)."""
    monkeypatch.setenv("QUICKSILVER_KERNELS", "ours")
    # a vocabulary of whole tiles, so the int8 head runs our kernel too (as SmolLM2's does)
    config = dataclasses.replace(FITS, n_layers=3, vocab_size=112)
    model = random_model(config, fast=False).to(dtype)
    convert_model(model, WeightFormat("int4"))
    engine = Engine(model, compile=compiled)
    assert engine.exact_attention and model.lm_head.native
    prompts = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(8))
    fed = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(9))
    cache = engine.new_cache(2, 32)
    engine.forward(prompts, cache)
    together = engine.forward(fed, cache, logits_at="all")
    cache = engine.new_cache(2, 32)
    engine.forward(prompts, cache)
    steps = [engine.forward(fed[:, t : t + 1], cache, logits_at="all") for t in range(6)]
    assert torch.equal(together, torch.cat(steps, 1))
    config = SpeculativeConfig(method="ngram", num_tokens=4)
    prompt = [[5, 9, 13, 2, 7, 5, 9, 13, 2, 7, 5, 9, 13]]
    plain = generate(engine, prompt, 24, ignore_eos=True)
    verified = generate(engine, prompt, 24, ignore_eos=True, speculative=config)
    assert verified.tokens == plain.tokens and verified.decode_steps < plain.decode_steps
    assert (engine.compile_seconds > 0) == compiled
