"""SkipDecode: the schedule's invariants, its errors, and generation under it (batched, with a
KV cache) on a tiny random Llama-like model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_accounting import TINY, random_model

from quicksilver.accounting import head_flops_per_token, layer_matmul_flops_per_token
from quicksilver.policies import Policy, PolicyConfigError, load_policy
from quicksilver.policies.skipdecode import SkipDecode, schedule_for_speedup
from quicksilver.runtime.engine import Engine
from quicksilver.runtime.generate import generate, prefill_block

L = 6
CONFIG = dataclasses.replace(TINY, n_layers=L)
SCHEDULE = ["skipdecode.max_layers=6", "skipdecode.min_layers=2", "skipdecode.decay_length=4"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return random_model(CONFIG, fast=False)


@pytest.mark.parametrize("power", [1.0, 0.5, 2.0])
def test_schedule_decays_monotonically_from_max_to_min(power: float) -> None:
    policy = SkipDecode(max_layers=6, min_layers=2, decay_length=8, warmup_layers=1, power=power)
    layers = policy.layers_at(torch.arange(-2, 20), L)
    assert layers[:2].tolist() == [L, L]  # prompt positions run every layer
    generated = layers[2:]
    assert generated[0] == 6 and bool((generated[8:] == 2).all())
    assert bool((generated[1:] <= generated[:-1]).all())


def test_plan_keeps_warmup_and_top_layers_and_skips_just_above_warmup() -> None:
    policy = SkipDecode(max_layers=5, min_layers=3, decay_length=2, warmup_layers=2)
    steps = torch.tensor([-1, 0, 1, 2, 9])
    plan = policy.layer_plan(steps, L)
    layers = policy.layers_at(steps, L)
    for row, n in zip(plan, layers.tolist(), strict=True):
        assert int(row.sum()) == n
        assert bool(row[:2].all()) and bool(row[-1])  # warm-up and top layers always run
        skipped = torch.nonzero(~row).flatten().tolist()
        assert skipped == list(range(2, 2 + L - n))  # one block, right above the warm-up
    # a later position skips a superset of an earlier one's layers: K/V it reads exist
    assert bool((plan[1:] <= plan[:-1]).all())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_layers": 3, "min_layers": 4}, "must not exceed max_layers"),
        ({"max_layers": 4}, "both max_layers and min_layers"),
        ({"max_layers": 4, "min_layers": 2, "decay_length": 0}, "decay_length"),
        ({"max_layers": 4, "min_layers": 2, "power": 0.0}, "power > 0"),
        ({"max_layers": 4, "min_layers": 2, "warmup_layers": -1}, "warmup_layers >= 0"),
    ],
)
def test_impossible_schedules_are_rejected(settings: dict, message: str) -> None:
    with pytest.raises(PolicyConfigError, match=message):
        Policy.from_config({"skipdecode": settings})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_layers": 7, "min_layers": 2}, "exceeds this model's 6 layers"),
        ({"max_layers": 6, "min_layers": 3, "warmup_layers": 3}, "must exceed warmup_layers"),
        ({"max_layers": 6, "min_layers": 3, "warmup_layers": 8}, "must exceed warmup_layers"),
    ],
)
def test_schedules_that_do_not_fit_the_model(model, settings: dict, message: str) -> None:
    with pytest.raises(PolicyConfigError, match=message):
        Engine(model, policy=Policy.from_config({"skipdecode": settings}))


PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12]]


def test_full_schedule_equals_dense_generation(model) -> None:
    dense = generate(Engine(model), PROMPTS, 8, ignore_eos=True)
    full = ["skipdecode.max_layers=6", "skipdecode.min_layers=6"]
    same = generate(Engine(model, policy=load_policy(None, full)), PROMPTS, 8, ignore_eos=True)
    assert same.tokens == dense.tokens and same.flops == dense.flops


def test_generation_skips_exactly_the_scheduled_layers(model) -> None:
    engine = Engine(model, policy=load_policy(None, SCHEDULE))
    result = generate(engine, PROMPTS, 8, ignore_eos=True)
    policy = engine.policy.get("skipdecode")
    fed_back = torch.arange(7)  # generated tokens 0..6 are fed back; the 8th is not
    layers = int(policy.layers_at(fed_back, L).sum())
    assert result.flops["layer_tokens"] == len(PROMPTS) * (4 * L + layers)
    dense = generate(Engine(model), PROMPTS, 8, ignore_eos=True)
    assert result.flops["total"] < dense.flops["total"]


def test_every_kv_entry_read_was_written(model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches start as NaN: a single read of an entry no forward wrote would poison the
    logits. A schedule that increases (breaking the invariant) must be caught."""
    original = Engine.new_cache

    def nan_cache(self, batch_size, max_len):
        cache = original(self, batch_size, max_len)
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))
        return cache

    monkeypatch.setattr(Engine, "new_cache", nan_cache)
    engine = Engine(model, policy=load_policy(None, SCHEDULE))
    reference = generate(engine, PROMPTS, 8, ignore_eos=True)
    logits, cache = prefill_block(engine, PROMPTS, 8)
    assert bool(torch.isfinite(logits).all())
    for token in reference.tokens[0][:7]:
        logits = engine.forward(torch.tensor([[token], [token]]), cache)
        assert bool(torch.isfinite(logits).all())
    # the negative control: layers that grow back after shrinking read unwritten entries
    monkeypatch.setattr(
        SkipDecode, "layers_at", lambda self, steps, n: torch.where(steps % 2 == 0, 2, n)
    )
    logits, cache = prefill_block(engine, PROMPTS, 8)
    for token in reference.tokens[0][:3]:
        logits = engine.forward(torch.tensor([[token], [token]]), cache)
    assert not bool(torch.isfinite(logits).all())


def test_batched_equals_unbatched_generation(model) -> None:
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    engine = Engine(model, policy=load_policy(None, SCHEDULE))
    together = generate(engine, prompts, 8, ignore_eos=True).tokens
    # rows are aligned by generation step, so each row alone follows the same schedule
    alone = [generate(engine, [p], 8, ignore_eos=True).tokens[0] for p in prompts]
    assert together == alone


def test_teacher_forced_logits_equal_generation(model) -> None:
    engine = Engine(model, policy=load_policy(None, SCHEDULE))
    prompt = PROMPTS[0]
    generated = generate(engine, [prompt], 8, ignore_eos=True).tokens[0]
    sequence = torch.tensor([prompt + generated[:-1]])
    cache = engine.new_cache(1, sequence.shape[1])
    cache.set_prompt_end(len(prompt))  # positions from here on are generated steps 0, 1, ...
    logits = engine.forward(sequence, cache, logits_at="all")[0]
    predicted = logits[len(prompt) - 1 :].argmax(-1).tolist()
    assert predicted == generated


DEEP = dataclasses.replace(TINY, n_layers=30)


def decode_cost(policy: SkipDecode, tokens: int) -> float:
    """Matmul FLOPs per generated token, LM head included, by hand."""
    layers = float(policy.layers_at(torch.arange(tokens - 1), 30).float().mean())
    return layers * layer_matmul_flops_per_token(DEEP) + head_flops_per_token(DEEP)


@pytest.mark.parametrize("target", [1.0, 1.5, 2.0, 3.0])
def test_target_speedup_derives_a_schedule(target: float) -> None:
    policy = schedule_for_speedup(DEEP, target, new_tokens=64)
    dense = 30 * layer_matmul_flops_per_token(DEEP) + head_flops_per_token(DEEP)
    assert decode_cost(policy, 64) <= dense / target * (1 + 1e-9)
    assert policy.min_layers > policy.warmup_layers and policy.max_layers <= 30
    if policy.min_layers < policy.max_layers:  # one more layer at the end misses the target
        gentler = SkipDecode(policy.max_layers, policy.min_layers + 1, 63, policy.warmup_layers)
        assert decode_cost(gentler, 64) > dense / target


def test_the_head_counts_in_the_target() -> None:
    """The LM head always runs: with a head as heavy as 8 layers (SmolLM2-135M's), 2x needs
    (30 + 8) / 2 - 8 = 11 layers on average, not 15."""
    vocab = 8 * layer_matmul_flops_per_token(DEEP) // (2 * DEEP.embed_dim)
    heavy = dataclasses.replace(DEEP, vocab_size=vocab)
    policy = schedule_for_speedup(heavy, 2.0, new_tokens=64)
    layers = float(policy.layers_at(torch.arange(63), 30).float().mean())
    assert 10 < layers <= 11 + 1e-9


@pytest.mark.parametrize(
    ("args", "message"),
    [((DEEP, 0.5, 64), ">= 1"), ((DEEP, 40.0, 64), "gives at most"), ((DEEP, 2.0, 0), ">= 1")],
)
def test_impossible_targets(args: tuple, message: str) -> None:
    with pytest.raises(PolicyConfigError, match=message):
        schedule_for_speedup(*args)
