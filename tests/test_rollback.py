"""Rolling the KV cache back (``KVCache.truncate``): after generating n tokens and rolling back,
the cache and the logits that follow are those of never having generated them — for every
policy of the shared matrix (and SkipDecode), uniformly and for ragged rows."""

from __future__ import annotations

import pytest
import torch
from test_accounting import random_model
from test_generation_policies import CONFIGS
from test_policies import CONFIG, make_engine

from quicksilver.errors import QuicksilverError
from quicksilver.runtime.cache import KVCache
from quicksilver.runtime.generate import prefill_block

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
STEPS = 6  # decode steps in the reference run


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, fast=True)


pytestmark = pytest.mark.usefixtures("single_thread")


def snapshot(cache: KVCache) -> dict[str, torch.Tensor | None]:
    """Everything the cache holds: entries, lengths, the prompt boundary, policy state."""
    return {
        "k": cache.k.clone(),
        "v": cache.v.clone(),
        "lengths": cache.lengths.clone(),
        "prompt_end": None if cache.prompt_end is None else cache.prompt_end.clone(),
        "visible": None if cache.visible is None else cache.visible.clone(),
        "log_size": None if cache.log_size is None else cache.log_size.clone(),
        "adapted": torch.tensor(cache.adapted),
    }


def row_state(state: dict, row: int) -> dict[str, torch.Tensor | None]:
    """One row's part of a snapshot; absent policy state reads as its default."""
    k = state["k"]
    visible = state["visible"]
    log_size = state["log_size"]
    return {
        "k": k[:, row],
        "v": state["v"][:, row],
        "length": state["lengths"][row],
        "prompt_end": state["prompt_end"][row],
        "visible": (
            torch.ones(k.shape[0], k.shape[3], dtype=torch.bool)
            if visible is None
            else visible[:, row]
        ),
        "log_size": torch.zeros(k.shape[0], k.shape[3]) if log_size is None else log_size[:, row],
    }


def assert_same_state(actual: dict, expected: dict, atol: float = 0.0) -> None:
    for key, value in expected.items():
        got = actual[key]
        if value is None:
            assert got is None, key
        elif atol and value.is_floating_point():
            torch.testing.assert_close(got, value, atol=atol, rtol=0, msg=key)
        else:
            assert torch.equal(got, value), f"{key} differs after rollback"


def reference_run(engine, tokens: torch.Tensor):
    """Prefill, then feed ``tokens`` [B, STEPS] one column at a time: logits and cache
    snapshots after the prefill (index 0) and after each step."""
    _, cache = prefill_block(engine, PROMPTS, STEPS + 1)
    states, logits = [snapshot(cache)], []
    for step in range(STEPS):
        logits.append(engine.forward(tokens[:, step : step + 1], cache))
        states.append(snapshot(cache))
    return cache, states, logits


def tokens_for(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG.vocab_size, (len(PROMPTS), STEPS), generator=gen)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_uniform_rollback_then_regenerate_is_identical(model, name: str) -> None:
    engine = make_engine(model, CONFIGS[name])
    tokens = tokens_for(1)
    cache, states, logits = reference_run(engine, tokens)
    back = 4
    cache.truncate(back)
    assert_same_state(snapshot(cache), states[STEPS - back])
    for step in range(STEPS - back, STEPS):
        again = engine.forward(tokens[:, step : step + 1], cache)
        assert torch.equal(again, logits[step]), f"logits differ at step {step}"
    assert_same_state(snapshot(cache), states[STEPS])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ragged_rollback_then_regenerate_matches(model, name: str) -> None:
    """Rows rolled back by different counts diverge in length; each then continues from its
    own slot, and must see exactly what it saw the first time."""
    engine = make_engine(model, CONFIGS[name])
    tokens = tokens_for(2)
    cache, states, logits = reference_run(engine, tokens)
    back = [2, 5, 3]
    cache.truncate(back)
    rolled = snapshot(cache)
    for row, count in enumerate(back):
        assert_same_state(row_state(rolled, row), row_state(states[STEPS - count], row))
    assert cache.shared_length is None
    for j in range(min(back)):  # every row stays inside the recorded history
        column = torch.tensor([int(tokens[r, STEPS - c + j]) for r, c in enumerate(back)])
        again = engine.forward(column.view(-1, 1), cache)
        for row, count in enumerate(back):
            torch.testing.assert_close(
                again[row], logits[STEPS - count + j][row], atol=2e-5, rtol=0
            )
    after = snapshot(cache)
    for row, count in enumerate(back):
        expected = row_state(states[STEPS - count + min(back)], row)
        assert_same_state(row_state(after, row), expected, atol=2e-6)


def test_rollback_of_a_subset_of_rows_keeps_the_others(model) -> None:
    engine = make_engine(model, CONFIGS["halt_skip"])
    cache, states, _ = reference_run(engine, tokens_for(3))
    cache.truncate(3, rows=[1])
    now = snapshot(cache)
    assert_same_state(row_state(now, 1), row_state(states[STEPS - 3], 1))
    for row in (0, 2):
        assert_same_state(row_state(now, row), row_state(states[STEPS], row))


def test_rolling_back_into_the_prompt_moves_the_prompt_boundary(model) -> None:
    engine = make_engine(model, CONFIGS["skipdecode"])
    _, cache = prefill_block(engine, PROMPTS, 4)
    longest = max(map(len, PROMPTS))
    cache.truncate(1)
    assert cache.prompt_end.tolist() == [longest - 1] * len(PROMPTS)


@pytest.mark.parametrize(
    ("count", "rows", "message"),
    [
        (-1, None, "cannot roll back"),
        (7, [1], "cannot roll back"),  # row 1 holds 2 prompt tokens + nothing generated... < 7
        (1, [3], "rows to roll back"),
        (1, [0, 0], "once"),
    ],
)
def test_bad_rollbacks_are_clear_errors(model, count, rows, message) -> None:
    engine = make_engine(model, None)
    _, cache = prefill_block(engine, PROMPTS, 2)
    before = snapshot(cache)
    with pytest.raises(QuicksilverError, match=message):
        cache.truncate(count, rows=rows)
    assert_same_state(snapshot(cache), before)  # nothing half-done
