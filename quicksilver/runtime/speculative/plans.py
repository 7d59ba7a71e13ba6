"""Drafting plans by what changes their cost: each measured once, in pieces, off the request path.

A ``DraftPlans`` maps a key (the policy's configuration: everything else that changes cost,
the model file, dtype, weights, torch, threads and CPU, is fixed for one loaded model and is
the store's part of the key) to a measured ``DraftPlan``. The ``LLM`` owns one and hands it
to every step batch, so a plan is measured once however many batches ask for it; a
``PlanStore`` behind it (the API's files on disk) keeps plans across processes.

Measuring takes tens of seconds. Where a row needs a plan that is not ready, ``start`` begins
a ``PlanMeasurement`` and the row decodes meanwhile as ``default_plan`` allows (no model
drafts); each step of a batch on that engine then runs one piece of it (``advance``), so no
row waits more than one piece for its next token. ``measure`` runs it to its end at once, for
callers that want the plan before timing anything.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from quicksilver.runtime.speculative.cost_plan import DraftPlan, PlanMeasurement, default_plan

if TYPE_CHECKING:
    from quicksilver.runtime.engine import Engine

Progress = Callable[[str], None]


class PlanStore(Protocol):
    """Where plans outlive the process: None from ``load`` when there is none to trust."""

    def load(self, key: str) -> DraftPlan | None: ...

    def save(self, key: str, plan: DraftPlan) -> None: ...

    def location(self, key: str) -> str: ...


def policy_key(engine: Engine) -> str:
    """The in-process key of a plan: costs and agreements depend on the policy."""
    policy = engine.policy
    return json.dumps(policy.to_config() if policy is not None else {}, sort_keys=True)


def _note(message: str) -> None:
    """One line on stderr, terminal or not: a long wait is never silent."""
    print(f"quicksilver: {message}", file=sys.stderr, flush=True)


class DraftPlans:
    """The plans of one model (see the module docstring). ``calibration_text()``: the tokens
    a measurement continues (None: the asking row's prompt, for a model without a tokenizer)."""

    def __init__(
        self,
        store: PlanStore | None = None,
        calibration_text: Callable[[], Sequence[int] | None] | None = None,
    ) -> None:
        self.store = store
        self._calibration_text = calibration_text
        self._plans: dict[str, DraftPlan] = {}
        self._measuring: dict[str, PlanMeasurement] = {}

    def add(self, engine: Engine, plan: DraftPlan) -> None:
        """Use ``plan`` under the engine's current policy (one measured elsewhere)."""
        self._plans[policy_key(engine)] = plan

    def ready(self, engine: Engine) -> DraftPlan | None:
        """The plan for the engine's current policy if one is known here or in the store."""
        key = policy_key(engine)
        plan = self._plans.get(key)
        if plan is None and self.store is not None and key not in self._measuring:
            plan = self.store.load(key)
            if plan is not None:
                self._plans[key] = plan
        return plan

    def pending(self, engine: Engine) -> PlanMeasurement | None:
        """The measurement under way for the engine's current policy, if any."""
        return self._measuring.get(policy_key(engine))

    def start(self, engine: Engine, fallback_prompt: Sequence[int]) -> bool:
        """Begin measuring the current policy's plan unless it is under way; True if begun
        now. Nothing runs yet: ``advance`` or ``measure`` run the pieces."""
        key = policy_key(engine)
        if key in self._measuring:
            return False
        text = self._calibration_text() if self._calibration_text is not None else None
        self._measuring[key] = PlanMeasurement(engine, fallback_prompt if text is None else text)
        return True

    def advance(self, engine: Engine) -> PlanMeasurement | None:
        """One piece of the current policy's measurement, if one is under way; returns it
        (``done`` once its plan is kept here and in the store). Called after every step:
        with nothing under way it returns before serialising the policy into a key."""
        if not self._measuring:
            return None
        key = policy_key(engine)
        measuring = self._measuring.get(key)
        if measuring is not None:
            self._run(key, measuring, measuring.advance)
        return measuring

    def give_up(self, engine: Engine) -> None:
        """Follow ``default_plan`` (n-gram drafts only) under the current policy for the rest of
        this process: its measurement failed between steps, and measuring again at every step
        would fail every step. Nothing is stored, so another process measures afresh."""
        key = policy_key(engine)
        self._measuring.pop(key, None)
        self._plans[key] = default_plan()

    def measure(
        self, engine: Engine, fallback_prompt: Sequence[int], progress: Progress | None = None
    ) -> DraftPlan:
        """The plan for the current policy, measured now to its end if it is not ready (a
        measurement under way goes on where it stands). ``progress(message)`` hears each
        stage; without it one line on stderr says a measurement is running."""
        plan = self.ready(engine)
        if plan is not None:
            return plan
        key = policy_key(engine)
        where = f" (kept in {self.store.location(key)})" if self.store is not None else ""
        message = f"measuring the drafting plan once for this model and machine{where}"
        if progress is None:
            _note(f"{message}; this takes tens of seconds")
        else:
            progress(message)
        self.start(engine, fallback_prompt)
        measuring = self._measuring[key]
        self._run(key, measuring, lambda: measuring.finish(progress))
        return measuring.plan

    def _run(self, key: str, measuring: PlanMeasurement, work: Callable[[], object]) -> None:
        """Run ``work`` on a measurement; keep its plan once done. A measurement that fails
        is dropped, so the next request starts it afresh."""
        try:
            work()
        except BaseException:
            self._measuring.pop(key, None)
            raise
        if measuring.done:
            del self._measuring[key]
            self._plans[key] = measuring.plan
            if self.store is not None:
                self.store.save(key, measuring.plan)
