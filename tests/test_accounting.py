"""The FLOP counter counts exactly what ran, and agrees with torch's own counter."""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from quicksilver.accounting import (
    attention_flops_per_pair,
    causal_pairs,
    dense_flops,
    head_flops_per_token,
    layer_matmul_flops_per_token,
)
from quicksilver.models.config import ModelConfig
from quicksilver.models.loading import build_model
from quicksilver.models.transformer import Transformer
from quicksilver.runtime.engine import Engine
from quicksilver.runtime.generate import generate

TINY = ModelConfig(
    family="llama",
    vocab_size=97,
    hidden_size=48,
    n_layers=3,
    n_heads=6,
    n_kv_heads=2,
    intermediate_size=80,
    max_position_embeddings=64,
)


def random_model(config: ModelConfig, fast: bool) -> Transformer:
    torch.manual_seed(0)
    shapes = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    state = {k: torch.randn(s) * 0.1 for k, s in shapes.items() if k != "lm_head.weight"}
    return build_model(config, state, torch.float32, fast)


def test_dense_formula_by_hand():
    d, f, q, kv = 48, 80, 48, 16
    assert layer_matmul_flops_per_token(TINY) == 2 * (d * (q + 2 * kv) + q * d + d * 2 * f + f * d)
    assert attention_flops_per_pair(TINY) == 4 * 6 * 8
    assert head_flops_per_token(TINY) == 2 * d * 97


def test_prefill_count_equals_analytical_formula():
    engine = Engine(random_model(TINY, fast=True))
    n = 11
    engine.forward(torch.randint(0, 97, (2, n)), engine.new_cache(2, 32), logits_at="all")
    expected = dense_flops(
        TINY, n_tokens=2 * n, attended_pairs=2 * n * (n + 1) // 2, head_tokens=2 * n
    )
    assert engine.counter.total == expected


def test_decode_counts_real_attended_length_and_ragged_padding():
    engine = Engine(random_model(TINY, fast=True))
    generate(engine, [[1, 2, 3, 4, 5], [6, 7]], max_new_tokens=4, ignore_eos=True)
    # prefill: a [2, 5] block (row 1 padded by 3, each pad row reads only itself);
    # decode: 3 steps of 2 rows, row 0 at slots 5..7, row 1 the same slots minus 3 pads.
    prefill_pairs = 15 + (3 + 3)  # row 0 causal 1+..+5; row 1: 3 pads x1 + real 1+2
    decode_pairs = sum((6 + i) + (3 + i) for i in range(3))
    expected = dense_flops(
        TINY, n_tokens=10 + 6, attended_pairs=prefill_pairs + decode_pairs, head_tokens=2 + 6
    )
    assert engine.counter.total == expected
    assert engine.counter.layer_tokens == TINY.n_layers * 16


def test_head_only_where_asked():
    engine = Engine(random_model(TINY, fast=True))
    engine.forward(
        torch.randint(0, 97, (1, 9)), engine.new_cache(1, 16), logits_at=torch.tensor([4, 8])
    )
    assert engine.counter.head == 2 * head_flops_per_token(TINY)


def torch_matmul_flops(mode: FlopCounterMode) -> int:
    counts = mode.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if "mm" in str(op))


def test_matmuls_agree_with_torch_flop_counter():
    """With plain F.linear (fast path off) torch sees every matmul; totals must agree."""
    engine = Engine(random_model(TINY, fast=False))
    cache = engine.new_cache(1, 32)
    tokens = torch.randint(0, 97, (1, 7))
    with FlopCounterMode(display=False) as mode:
        engine.forward(tokens, cache, logits_at="all")
    ours = engine.counter.matmul + engine.counter.head
    assert torch_matmul_flops(mode) == ours

    # A decode step attends with two batched matmuls: torch counts those too.
    engine.counter.reset()
    with FlopCounterMode(display=False) as mode:
        engine.forward(torch.tensor([[3]]), cache)
    assert torch_matmul_flops(mode) == engine.counter.total


def test_smollm_dense_decode_matches_torch_counter(smollm_fp32):
    model = smollm_fp32.model
    engine = Engine(model)
    cache = engine.new_cache(1, 16)
    engine.forward(torch.arange(100, 110).view(1, -1), cache)
    model.set_fast_path(False)
    try:
        engine.counter.reset()
        with FlopCounterMode(display=False) as mode:
            engine.forward(torch.tensor([[42]]), cache)
    finally:
        model.set_fast_path(True)
    assert torch_matmul_flops(mode) == engine.counter.total
    per_layer = layer_matmul_flops_per_token(model.config) + 11 * attention_flops_per_pair(
        model.config
    )
    assert engine.counter.per_layer == [per_layer] * model.config.n_layers


def test_causal_pairs_with_and_without_a_sliding_window():
    assert causal_pairs(5) == 1 + 2 + 3 + 4 + 5
    assert causal_pairs(5, 2) == 1 + 2 + 2 + 2 + 2
    assert causal_pairs(3, 10) == causal_pairs(3)


def test_perplexity_dense_reference_follows_the_sliding_window():
    """A dense sliding-window model's counted FLOPs equal the dense reference exactly."""
    from quicksilver.eval.perplexity import evaluate_perplexity

    config = dataclasses.replace(TINY, sliding_window=6)
    engine = Engine(random_model(config, fast=True))
    result = evaluate_perplexity(engine, list(range(1, 40)), context=16, stride=8)
    assert result.flops_per_token == result.dense_flops_per_token
