"""The calibration search, on a fake evaluation whose quality and cost are known functions of
the threshold factor, so the right answer is known exactly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from quicksilver.errors import QuicksilverError
from quicksilver.eval import calibrate as calibration
from quicksilver.policies import Policy

BASE = Policy.from_config({"halting": {"relative_drift": 0.2}})


class FakeEngine:
    def __init__(self) -> None:
        self.policy = None

    def set_policy(self, policy) -> None:
        self.policy = policy


def fake_run(engine: FakeEngine, token_ids, **_: object) -> SimpleNamespace:
    """ppl grows as 10 (1 + 0.1 f^2), FLOPs fall as 1 - 0.2 f (floor 0.5), f the factor."""
    f = 0.0 if engine.policy is None else engine.policy.get("halting").relative_drift / 0.2
    flops = 1000 * max(0.5, 1 - 0.2 * f)
    return SimpleNamespace(
        ppl=10 * (1 + 0.1 * f * f), flops={"total": flops}, seconds=1.0, tokens=9
    )


@pytest.fixture(autouse=True)
def fake_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "evaluate_perplexity", fake_run)


def search(**budget: float) -> calibration.CalibrationResult:
    measure = calibration.perplexity_measure(FakeEngine(), [1, 2, 3])
    return calibration.calibrate(measure, BASE, steps=8, log=lambda _: None, **budget)


@pytest.mark.parametrize("budget", [0.01, 0.05, 0.2, 0.5])
def test_quality_budget_finds_the_largest_factor(budget: float) -> None:
    result = search(max_ppl_increase=budget)
    best = (budget / 0.1) ** 0.5  # 0.1 f^2 = budget
    assert result.met and result.chosen.feasible
    assert result.factor <= best and result.factor == pytest.approx(best, rel=0.05)
    assert result.policy["halting"]["relative_drift"] == pytest.approx(0.2 * result.factor)


@pytest.mark.parametrize("fraction", [0.95, 0.9, 0.6])
def test_compute_budget_finds_the_smallest_factor(fraction: float) -> None:
    result = search(flop_fraction=fraction)
    best = (1 - fraction) / 0.2  # 1 - 0.2 f = fraction
    assert result.met and result.chosen.flop_fraction <= fraction
    assert result.factor >= best * (1 - 1e-9) and result.factor == pytest.approx(best, rel=0.05)


def test_unreachable_budget_reports_the_closest_trial() -> None:
    result = search(flop_fraction=0.3)  # FLOPs never fall below half
    assert not result.met
    assert result.chosen.flop_fraction == min(t.flop_fraction for t in result.trials)


@pytest.mark.parametrize(
    ("config", "budget", "message"),
    [
        ({}, {"max_ppl_increase": 0.01}, "no threshold to scale"),
        ({"kv_skip": {"treatment": "skip"}}, {"max_ppl_increase": 0.01}, "no threshold"),
        (
            {"matryoshka": {"entropy_high": 2.0, "entropy_low": 1.0}},
            {"flop_fraction": 0.5},
            "bytes moved, not FLOPs",
        ),
        ({"halting": {"drift": 1.0}}, {}, "exactly one budget"),
        ({"halting": {"drift": 1.0}}, {"max_ppl_increase": -0.1}, ">= 0"),
        ({"halting": {"drift": 1.0}}, {"flop_fraction": 1.5}, "(0, 1]"),
    ],
)
def test_bad_calibrations(config: dict, budget: dict, message: str) -> None:
    with pytest.raises(QuicksilverError, match=message.replace("(", r"\(").replace(")", r"\)")):
        measure = calibration.perplexity_measure(FakeEngine(), [1, 2])
        calibration.calibrate(measure, Policy.from_config(config), **budget)
