"""Property-based: any policy configuration either is refused with a PolicyConfigError or runs
through the runner (prefill and decode) to finite logits — never another exception."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_accounting import TINY, random_model

from quicksilver.policies import REGISTRY, Policy, PolicyConfigError
from quicksilver.runtime.engine import Engine
from quicksilver.runtime.generate import generate

CONFIG = dataclasses.replace(TINY, n_layers=4, max_position_embeddings=64)

# Mostly plausible values (so most drawn policies run), some hostile ones.
PLAUSIBLE = st.sampled_from(
    [None, 0, 1, 2, 3, 4, 8, 16, 0.0, 0.05, 0.2, 0.5, 1.0, 3.99, 6.597, 7.0, True, False]
    + [
        "propagate",
        "skip",
        "zero",
        "l2",
        "cosine",
        "relative_l2",
        "auto",
        "planes",
        "int8",
        "simulated",
    ]
)
HOSTILE = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
)
VALUES = st.one_of(PLAUSIBLE, PLAUSIBLE, PLAUSIBLE, HOSTILE)


@st.composite
def configs(draw) -> dict:
    config = {}
    for name in draw(st.lists(st.sampled_from(list(REGISTRY)), unique=True, max_size=3)):
        cls = REGISTRY[name]
        fields = [f.name for f in dataclasses.fields(cls)]
        keys = draw(st.lists(st.sampled_from(fields * 4 + ["bogus"]), unique=True, max_size=4))
        config[name] = {key: draw(VALUES) for key in keys}
    return config


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(random_model(CONFIG, fast=True))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(config=configs(), seed=st.integers(0, 3))
def test_any_policy_is_refused_cleanly_or_runs(engine: Engine, config: dict, seed: int) -> None:
    try:
        policy = Policy.from_config(config)
        engine.set_policy(policy)
    except PolicyConfigError:
        event("refused")
        return
    event("ran: dense" if policy.is_off else "ran: adaptive")
    try:
        gen = torch.Generator().manual_seed(seed)
        prompts = [
            torch.randint(0, CONFIG.vocab_size, (n,), generator=gen).tolist() for n in (5, 2)
        ]
        result = generate(engine, prompts, max_new_tokens=3, ignore_eos=True)
        assert [len(t) for t in result.tokens] == [3, 3]
        cache = engine.new_cache(1, 10)
        logits = engine.forward(torch.tensor([prompts[0] * 2]), cache, logits_at="all")
        assert torch.isfinite(logits).all()
    finally:
        engine.set_policy(None)
