"""Tests for next-token sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quicksilver.errors import QuicksilverError
from quicksilver.runtime.sampling import (
    SamplingConfig,
    draw_key,
    inverse_cdf,
    sample_tokens,
    uniform_at,
)


def _logits(batch: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def sample(logits: torch.Tensor, config: SamplingConfig, position: int = 0) -> torch.Tensor:
    """Every row drawn at ``position`` of the stream the config's seed keys (row b as the
    b-th row of one request)."""
    uniforms = [uniform_at(draw_key(config.seed, b), position) for b in range(logits.shape[0])]
    return sample_tokens(logits, config, uniforms)


def test_default_config_is_greedy() -> None:
    assert SamplingConfig().greedy
    assert not SamplingConfig(temperature=0.7).greedy
    assert SamplingConfig(temperature=0.7, top_k=1).greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = _logits().to(dtype)
    ids = sample(logits, SamplingConfig())
    assert ids.dtype == torch.int64
    assert ids.shape == (4,)
    assert torch.equal(ids, logits.argmax(dim=-1))


def test_top_k_one_equals_greedy() -> None:
    logits = _logits()
    config = SamplingConfig(temperature=1.5, top_k=1, seed=3)
    ids = sample(logits, config)
    assert torch.equal(ids, logits.argmax(dim=-1))


def test_top_k_keeps_only_the_k_best() -> None:
    logits = _logits(batch=2, vocab=100)
    config = SamplingConfig(temperature=5.0, top_k=3, seed=0)
    allowed = torch.topk(logits, 3, dim=-1).indices
    for position in range(200):
        ids = sample(logits, config, position)
        assert (allowed == ids[:, None]).any(dim=-1).all()


def test_tiny_top_p_keeps_only_the_argmax() -> None:
    logits = _logits(batch=8)
    config = SamplingConfig(temperature=10.0, top_p=1e-6, seed=0)
    for position in range(20):
        assert torch.equal(sample(logits, config, position), logits.argmax(dim=-1))


def test_top_p_keeps_the_smallest_covering_set() -> None:
    # probabilities 0.5, 0.3, 0.2: top_p=0.7 needs the first two tokens, never the third.
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    config = SamplingConfig(temperature=1.0, top_p=0.7, seed=0)
    seen = {int(sample(logits, config, position)) for position in range(300)}
    assert seen == {0, 1}


def test_seeded_sampling_is_reproducible() -> None:
    logits = _logits(vocab=1000)
    config = SamplingConfig(temperature=1.0, top_k=50, top_p=0.9, seed=1234)

    def run() -> list[torch.Tensor]:
        return [sample(logits, config, position) for position in range(5)]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    # Sampling at a high temperature is not stuck on one token.
    assert len({tuple(t.tolist()) for t in first}) > 1


def test_rows_are_independent() -> None:
    logits = _logits(batch=3, vocab=1000)
    other = logits.clone()
    other[0] = torch.randn(1000) * 3
    other[2] = torch.randn(1000) * 3
    config = SamplingConfig(temperature=1.0, top_p=0.95, seed=7)
    a = sample(logits, config)
    b = sample(other, config)
    assert a[1] == b[1]


def test_draw_keys_follow_seed_index_and_global_generator() -> None:
    assert draw_key(5, 0) == draw_key(5, 0) != draw_key(5, 1) != draw_key(6, 1)
    torch.manual_seed(0)
    first = draw_key(None)
    torch.manual_seed(0)
    assert draw_key(None) == first  # torch.manual_seed still repeats an unseeded run
    assert draw_key(None) != first


def test_uniforms_are_uniform_and_independent_of_other_positions() -> None:
    key = draw_key(11)
    values = np.array([uniform_at(key, position) for position in range(20000)])
    assert ((values >= 0) & (values < 1)).all()
    # Ten equal bins, each within a few standard errors of 2000 draws.
    counts = np.histogram(values, bins=10, range=(0, 1))[0]
    assert (abs(counts - 2000) < 5 * math.sqrt(2000)).all()
    # Neighbouring positions are uncorrelated.
    assert abs(np.corrcoef(values[:-1], values[1:])[0, 1]) < 0.03


def test_inverse_cdf_picks_the_interval_holding_u() -> None:
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]], dtype=torch.float64)
    picks = [int(inverse_cdf(probs, [u])[0]) for u in (0.0, 0.49, 0.5, 0.79, 0.8, 0.999999)]
    assert picks == [0, 0, 2, 2, 3, 3]  # a token of probability 0 is never chosen


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
    ],
)
def test_invalid_config_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(QuicksilverError, match=message):
        SamplingConfig(**kwargs)


def test_rejects_non_2d_logits() -> None:
    with pytest.raises(ValueError, match="batch, vocab"):
        sample_tokens(torch.zeros(5), SamplingConfig(), [0.5])
    with pytest.raises(ValueError, match="batch, vocab"):
        sample_tokens(torch.zeros(2, 0), SamplingConfig(), [0.5, 0.5])


# --- extreme but valid settings ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 1e-45},  # below float32's smallest subnormal
        {"temperature": 5e-324},  # float64's smallest subnormal
        {"temperature": 1.0, "top_p": 1e-300},
        {"temperature": 1.0, "top_p": 5e-324},
        {"temperature": 1e-300, "top_p": 1e-300, "top_k": 2},
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_settings_pick_the_argmax(kwargs: dict, dtype: torch.dtype) -> None:
    logits = _logits(batch=6, vocab=300).to(dtype)
    config = SamplingConfig(**kwargs, seed=0)
    ids = sample(logits, config)
    assert torch.equal(ids, logits.argmax(dim=-1))


def test_extreme_logits_near_the_dtype_maximum() -> None:
    """Huge logits divided by a tiny temperature must not overflow into NaN."""
    logits = torch.full((2, 8), 65000.0, dtype=torch.float16)
    logits[0, 3] = 65504.0
    logits[1, 5] = -65504.0
    config = SamplingConfig(temperature=1e-30, seed=1)
    ids = sample(logits, config)
    assert ids[0] == 3 and ids[1] != 5


def test_huge_temperature_is_near_uniform() -> None:
    logits = _logits(batch=1, vocab=20)
    config = SamplingConfig(temperature=1e300, seed=0)
    seen = {int(sample(logits, config, position)) for position in range(300)}
    assert len(seen) == 20


# --- bad values: clear errors, never TypeError ----------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": "0.7"}, "temperature must be a finite number"),
        ({"temperature": True}, "temperature"),
        ({"temperature": None}, "temperature"),
        ({"temperature": [1.0]}, "temperature"),
        ({"temperature": 10**400}, "temperature"),  # too large for a float
        ({"temperature": torch.tensor(1.0)}, "temperature"),
        ({"top_k": True}, "top_k must be an integer"),
        ({"top_k": "3"}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_k": None}, "top_k"),
        ({"top_p": "0.9"}, "top_p"),
        ({"top_p": False}, "top_p"),
        ({"top_p": None}, "top_p"),
        ({"top_p": float("inf")}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"seed": "1"}, "seed must be an integer"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": float("nan")}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
    ],
)
def test_bad_types_raise_quicksilver_error(kwargs: dict, message: str) -> None:
    with pytest.raises(QuicksilverError, match=message):
        SamplingConfig(**kwargs)


def test_values_are_normalised() -> None:
    config = SamplingConfig(
        temperature=1, top_k=np.int64(5), top_p=np.float32(0.5), seed=np.uint8(3)
    )
    assert config == SamplingConfig(temperature=1.0, top_k=5, top_p=0.5, seed=3)
    assert type(config.temperature) is float and type(config.top_k) is int
    assert type(config.top_p) is float and type(config.seed) is int
    assert SamplingConfig(seed=2**64 - 1).seed == 2**64 - 1
    assert draw_key(SamplingConfig(seed=-(2**63)).seed) == draw_key(2**63)


# --- options without effect are named, never silently dropped --------------------------------


@pytest.mark.parametrize(
    "kwargs, vocab, ignored",
    [
        ({}, None, []),
        ({"temperature": 0.0, "seed": 1}, None, ["seed"]),
        ({"top_k": 5, "top_p": 0.9, "seed": 1}, None, ["top_k", "top_p", "seed"]),
        ({"top_k": 1}, None, ["top_k"]),
        (
            {"temperature": 0.8, "top_k": 1, "top_p": 0.5, "seed": 2},
            None,
            ["temperature", "top_p", "seed"],
        ),
        ({"temperature": 0.8, "top_k": 1}, None, ["temperature"]),
        ({"temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 2}, None, []),
        ({"temperature": 0.8, "top_k": 40}, 40, ["top_k"]),
        ({"temperature": 0.8, "top_k": 40}, 41, []),
        ({"temperature": 0.8, "seed": 3}, 10, []),
    ],
)
def test_ignored_names_the_options_without_effect(
    kwargs: dict, vocab: int | None, ignored: list[str]
) -> None:
    config = SamplingConfig(**kwargs)
    assert config.ignored(vocab) == ignored
    note = config.ignored_note(vocab)
    if ignored:
        assert note is not None and all(name in note for name in ignored)
    else:
        assert note is None


def test_ignored_note_says_why() -> None:
    greedy = SamplingConfig(top_p=0.9).ignored_note()
    assert (
        greedy
        == "top_p has no effect: temperature 0 means greedy decoding (always the most likely token)"
    )
    assert (
        "top_k 1 keeps only the most likely token"
        in SamplingConfig(temperature=1.0, top_k=1, seed=0).ignored_note()
    )
    assert "whole vocabulary of 10" in SamplingConfig(temperature=1.0, top_k=99).ignored_note(10)


# --- a broken model's logits ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("config", [SamplingConfig(), SamplingConfig(temperature=1.0, top_p=0.9)])
def test_non_finite_logits_are_an_error(bad: float, config: SamplingConfig) -> None:
    logits = _logits(batch=3)
    logits[1, 7] = bad
    with pytest.raises(QuicksilverError, match="NaN/inf logits"):
        sample(logits, config)


# --- property: any arguments give a clear error or a valid token ------------------------------

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, max_value=2.0),
    st.text(max_size=4),
    st.sampled_from([0, 1, 2, 5, 1e-45, 1e-300, 5e-324, 1.0, 1e300]),
)
LOGIT = st.one_of(
    st.floats(min_value=-1e5, max_value=1e5, allow_nan=False, width=32),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, 65504.0, -65504.0, 3e38, -3e38]),
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def logits_batches(draw: st.DrawFn) -> torch.Tensor:
    batch = draw(st.integers(min_value=1, max_value=3))
    vocab = draw(st.integers(min_value=1, max_value=12))
    values = draw(st.lists(LOGIT, min_size=batch * vocab, max_size=batch * vocab))
    dtype = draw(st.sampled_from(DTYPES))
    return torch.tensor(values, dtype=torch.float64).view(batch, vocab).to(dtype)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    temperature=ANY_VALUE,
    top_k=ANY_VALUE,
    top_p=ANY_VALUE,
    seed=ANY_VALUE,
    logits=logits_batches(),
)
def test_any_arguments_give_an_error_or_a_valid_token(
    temperature: object, top_k: object, top_p: object, seed: object, logits: torch.Tensor
) -> None:
    try:
        config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    except QuicksilverError:
        return
    finite = bool(torch.isfinite(logits).all())
    try:
        ids = sample(logits, config)
    except QuicksilverError as error:
        assert not finite, f"finite logits refused: {error}"
        assert "NaN/inf logits" in str(error)
        return
    assert finite, "non-finite logits must be refused"
    assert ids.dtype == torch.int64 and ids.shape == (logits.shape[0],)
    assert bool(((ids >= 0) & (ids < logits.shape[1])).all())
    chosen = logits.gather(1, ids[:, None]).squeeze(1)
    if config.greedy:
        assert torch.equal(chosen, logits.max(dim=-1).values)
    elif config.top_k:
        # The token is among the top_k best (ties with the k-th kept).
        k = min(config.top_k, logits.shape[1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1]
        assert bool((chosen >= kth).all())


def test_finite_logits_whose_sum_overflows_are_accepted() -> None:
    """The cheap check sums the logits; a sum that overflows from finite values falls back
    to the element-wise check instead of calling the model broken."""
    logits = torch.tensor([[3e38, 3e38, -1.0]], dtype=torch.float32)
    assert int(sample_tokens(logits, SamplingConfig(), [0.5])[0]) == 0
    with pytest.raises(QuicksilverError, match="NaN/inf"):
        sample_tokens(torch.tensor([[3e38, float("nan")]]), SamplingConfig(), [0.5])


def test_greedy_ties_take_the_first_best_in_every_dtype() -> None:
    from quicksilver.runtime.sampling import greedy_tokens

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0]], dtype=dtype)
        assert greedy_tokens(logits).tolist() == [1, 0]
