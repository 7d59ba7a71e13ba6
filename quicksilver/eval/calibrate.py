"""Calibrate a policy's thresholds on held-out text to meet one budget.

CALM's idea, in its simplest form: the user picks the signals (which mechanisms, which
layers); one knob — a factor that scales every threshold of the policy together
(``Policy.scaled``) — trades quality for compute. Larger thresholds halt, merge and
narrow more tokens, so quality and cost both fall monotonically (nearly: these are
measurements, not guarantees). We search that factor on a calibration split for either

- a quality budget: the largest factor whose perplexity is at most ``(1 + max_ppl_increase)``
  times the dense model's, or
- a compute budget: the smallest factor whose counted FLOPs are at most ``flop_fraction`` of
  the dense model's (the best quality at that cost),

by bracketing (doubling or halving from 1) and then geometric bisection. "Perplexity" is what
the measure says it is: sliding-window perplexity of a text (``perplexity_measure``, for
``eval``), or the dense model's perplexity of the policy's greedy continuations of a prompt set
with decode FLOPs (``generation_measure``, for ``eval-gen``: what a policy does while
generating). Every trial is a full run through the adaptive engine, so the numbers are real
and counted, and all are kept in the result. Calibrate on a validation split; evaluate the
chosen policy on a different one (``quicksilver eval --policy`` / ``eval-gen --policy``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from quicksilver.errors import QuicksilverError
from quicksilver.eval.generation import DenseReference
from quicksilver.eval.perplexity import evaluate_perplexity
from quicksilver.policies.stack import REGISTRY, Policy
from quicksilver.runtime.engine import Engine

MAX_BRACKET_STEPS = 8


@dataclass
class Measurement:
    ppl: float  # the quality figure: lower is better
    flops: float  # counted work of the same run (any unit, compared with dense's)
    seconds: float
    description: str = ""  # e.g. how many tokens were scored


# Measures a policy (None: the dense model) on fixed calibration data.
Measure = Callable[[Policy | None], Measurement]


def perplexity_measure(
    engine: Engine,
    token_ids: Sequence[int],
    *,
    context: int = 1024,
    stride: int = 512,
    batch_size: int = 1,
    max_windows: int | None = 16,
) -> Measure:
    """Sliding-window perplexity of ``token_ids`` and the FLOPs of the whole run."""

    def measure(policy: Policy | None) -> Measurement:
        engine.set_policy(policy)
        try:
            result = evaluate_perplexity(
                engine,
                token_ids,
                context=context,
                stride=stride,
                batch_size=batch_size,
                max_windows=max_windows,
            )
        finally:
            engine.set_policy(None)
        return Measurement(
            result.ppl, result.flops["total"], result.seconds, f"{result.tokens} tokens"
        )

    return measure


def generation_measure(
    model: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32, batch_size: int = 8
) -> Measure:
    """The dense model's perplexity of greedy continuations of ``prompts`` (the dense model's
    own for None, generated once) and the decode FLOPs per generated token."""
    dense: DenseReference | None = None  # generated at the first measurement

    def measure(policy: Policy | None) -> Measurement:
        nonlocal dense
        start = time.perf_counter()
        if dense is None:
            dense = DenseReference(
                model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
        described = f"{len(dense.prompts)} prompts x {max_new_tokens} tokens"
        if policy is None:
            ppl, flops = dense.ppl, dense.flops_per_token
        else:
            quality = dense.measure(policy)
            ppl, flops = quality.dense_ppl_of_policy, quality.policy_flops_per_token
        return Measurement(ppl, flops, time.perf_counter() - start, described)

    return measure


@dataclass
class Trial:
    factor: float
    ppl: float
    ppl_increase: float  # relative to dense
    flop_fraction: float  # counted FLOPs / dense counted FLOPs, same windows
    seconds: float
    feasible: bool


@dataclass
class CalibrationResult:
    policy: dict[str, Any]  # the chosen configuration (scaled thresholds)
    factor: float
    met: bool  # False when no trial met the budget (policy is then the closest trial)
    budget: dict[str, float]
    dense_ppl: float
    dense_seconds: float
    chosen: Trial
    trials: list[Trial] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SAVED = {
    "prompt_flops": "prompt FLOPs",
    "decode_flops": "decode FLOPs",
    "weight_bytes": "bytes moved",
}


def check_calibratable(policy: Policy, compute_budget: bool = False, decode: bool = False) -> None:
    """A policy can be calibrated when it has a threshold to scale; for a compute budget, one
    whose scaling changes the FLOPs measured (prefill/teacher-forced FLOPs for perplexity,
    decode FLOPs for generation), as each mechanism declares in ``savings``."""
    if not any(p.has_knob_set for p in policy.policies):
        raise QuicksilverError(
            "the policy to calibrate has no threshold to scale; set at least one of "
            + ", ".join(f"{cls.name}.{key}" for cls in REGISTRY.values() for key in cls.knobs)
            + " (with --policy FILE or --set)"
        )
    needed = "decode_flops" if decode else "prompt_flops"
    if compute_budget and needed not in policy.knob_savings:
        able = [cls.name for cls in REGISTRY.values() if needed in cls.savings and cls.knobs]
        what = "decode FLOPs" if decode else "FLOPs"
        changes = ", ".join(SAVED[k] for k in sorted(policy.knob_savings))
        raise QuicksilverError(
            f"a {what} budget cannot be met by this policy's thresholds: scaling them changes "
            f"{changes}, not {what}; it needs {' or '.join(able)} thresholds (or use "
            "--max-ppl-increase)"
        )


def check_budget(max_ppl_increase: float | None, flop_fraction: float | None, steps: int) -> None:
    """Reject a budget `calibrate` cannot search for, before the first (slow) measurement."""
    if (max_ppl_increase is None) == (flop_fraction is None):
        raise QuicksilverError("give exactly one budget: a perplexity increase or a FLOP fraction")
    if max_ppl_increase is not None and not (
        math.isfinite(max_ppl_increase) and max_ppl_increase >= 0
    ):
        raise QuicksilverError(
            f"the perplexity budget must be a finite increase >= 0, got {max_ppl_increase}"
        )
    if flop_fraction is not None and not 0 < flop_fraction <= 1:
        raise QuicksilverError(f"the FLOP fraction must be in (0, 1], got {flop_fraction}")
    if steps < 1:
        raise QuicksilverError(f"calibration needs at least 1 bisection step, got {steps}")


def bracket(trial: Callable[[float], Trial], small_ok: bool) -> tuple[Trial | None, Trial | None]:
    """A feasible and an infeasible trial around the budget's edge, either None when doubling
    or halving the factor from 1 never crossed it. ``small_ok``: small factors are the
    feasible ones (a quality budget); for a compute budget large ones are."""
    first = trial(1.0)
    if first.feasible:
        good, bad = first, None  # move outwards (up for quality, down for compute)
        for _ in range(MAX_BRACKET_STEPS):
            t = trial(good.factor * (2.0 if small_ok else 0.5))
            if t.feasible:
                good = t
            else:
                bad = t
                break
        return good, bad
    good, bad = None, first
    for _ in range(MAX_BRACKET_STEPS):
        t = trial(bad.factor * (0.5 if small_ok else 2.0))
        if t.feasible:
            good = t
            break
        bad = t
    return good, bad


def calibrate(
    measure: Measure,
    base: Policy,
    *,
    max_ppl_increase: float | None = None,
    flop_fraction: float | None = None,
    steps: int = 6,
    log: Callable[[str], None] | None = None,
) -> CalibrationResult:
    """Search the threshold factor of ``base`` for the budget (exactly one of the two)."""
    check_budget(max_ppl_increase, flop_fraction, steps)
    check_calibratable(base, compute_budget=flop_fraction is not None)
    say = log or (lambda message: print(message, file=sys.stderr))

    dense = measure(None)
    say(f"dense: ppl {dense.ppl:.4f} ({dense.description}, {dense.seconds:.1f} s)")
    trials: list[Trial] = []

    def trial(factor: float) -> Trial:
        result = measure(base.scaled(factor))
        increase = result.ppl / dense.ppl - 1
        fraction = result.flops / dense.flops
        if max_ppl_increase is not None:
            feasible = increase <= max_ppl_increase
        else:
            feasible = fraction <= flop_fraction
        t = Trial(factor, result.ppl, increase, fraction, result.seconds, feasible)
        trials.append(t)
        say(
            f"factor {factor:.4g}: ppl {result.ppl:.4f} ({increase:+.2%}), "
            f"FLOPs {fraction:.3f} of dense -> {'meets' if feasible else 'misses'} the budget"
        )
        return t

    # Quality budget: feasible for small factors. Compute budget: feasible for large ones.
    small_ok = max_ppl_increase is not None
    good, bad = bracket(trial, small_ok)
    if good is not None and bad is not None:
        for _ in range(steps):
            t = trial(math.sqrt(good.factor * bad.factor))
            good, bad = (t, bad) if t.feasible else (good, t)
    budget = (
        {"max_ppl_increase": max_ppl_increase}
        if max_ppl_increase is not None
        else {"flop_fraction": flop_fraction}
    )
    if good is not None:
        chosen, met = good, True
    else:  # nothing met the budget: report the trial closest to it
        key = (lambda t: t.ppl_increase) if small_ok else (lambda t: t.flop_fraction)
        chosen, met = min(trials, key=key), False
    return CalibrationResult(
        policy=base.scaled(chosen.factor).to_config(),
        factor=chosen.factor,
        met=met,
        budget=budget,
        dense_ppl=dense.ppl,
        dense_seconds=dense.seconds,
        chosen=chosen,
        trials=trials,
    )
