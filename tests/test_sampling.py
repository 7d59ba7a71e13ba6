"""Tests for next-token sampling."""

from __future__ import annotations

import pytest
import torch

from quicksilver.errors import QuicksilverError
from quicksilver.runtime.sampling import SamplingConfig, make_generator, sample_next


def _logits(batch: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_default_config_is_greedy() -> None:
    assert SamplingConfig().greedy
    assert not SamplingConfig(temperature=0.7).greedy
    assert SamplingConfig(temperature=0.7, top_k=1).greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = _logits().to(dtype)
    ids = sample_next(logits, SamplingConfig(), None)
    assert ids.dtype == torch.int64
    assert ids.shape == (4,)
    assert torch.equal(ids, logits.argmax(dim=-1))


def test_top_k_one_equals_greedy() -> None:
    logits = _logits()
    config = SamplingConfig(temperature=1.5, top_k=1, seed=3)
    ids = sample_next(logits, config, make_generator(config))
    assert torch.equal(ids, logits.argmax(dim=-1))


def test_top_k_keeps_only_the_k_best() -> None:
    logits = _logits(batch=2, vocab=100)
    config = SamplingConfig(temperature=5.0, top_k=3, seed=0)
    gen = make_generator(config)
    allowed = torch.topk(logits, 3, dim=-1).indices
    for _ in range(200):
        ids = sample_next(logits, config, gen)
        assert (allowed == ids[:, None]).any(dim=-1).all()


def test_tiny_top_p_keeps_only_the_argmax() -> None:
    logits = _logits(batch=8)
    config = SamplingConfig(temperature=10.0, top_p=1e-6, seed=0)
    gen = make_generator(config)
    for _ in range(20):
        assert torch.equal(sample_next(logits, config, gen), logits.argmax(dim=-1))


def test_top_p_keeps_the_smallest_covering_set() -> None:
    # probabilities 0.5, 0.3, 0.2: top_p=0.7 needs the first two tokens, never the third.
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    config = SamplingConfig(temperature=1.0, top_p=0.7, seed=0)
    gen = make_generator(config)
    seen = {int(sample_next(logits, config, gen)) for _ in range(300)}
    assert seen == {0, 1}


def test_seeded_sampling_is_reproducible() -> None:
    logits = _logits(vocab=1000)
    config = SamplingConfig(temperature=1.0, top_k=50, top_p=0.9, seed=1234)

    def run() -> list[torch.Tensor]:
        gen = make_generator(config)
        return [sample_next(logits, config, gen) for _ in range(5)]

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
    a = sample_next(logits, config, make_generator(config))
    b = sample_next(other, config, make_generator(config))
    assert a[1] == b[1]


def test_make_generator_without_seed_is_none() -> None:
    assert make_generator(SamplingConfig(temperature=1.0)) is None
    assert isinstance(make_generator(SamplingConfig(seed=0)), torch.Generator)


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
        sample_next(torch.zeros(5), SamplingConfig(), None)
