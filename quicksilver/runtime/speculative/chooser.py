"""Each step's drafts for the rows of a step batch: which method, how many tokens, and the
model's draft forwards, batched across the rows that draft with the model.

A row's ``SpeculativeConfig`` names its method (``speculative.settings``). Model drafters run
their draft forwards over the leading cache rows up to the last row that drafts with them
(the step core keeps rows contiguous; a row in between that drafts otherwise rides along,
its work counted as drafting). ``auto`` keeps, per row, a decayed count of how many drafted
tokens each method got accepted, and each step picks the method and length with the most
expected tokens per unit of measured time (``DraftPlan.best_length``), or no draft where
none is expected to beat plain decoding.

The plan comes from the batch's ``DraftPlans``. Until it is measured (a piece per step, by
the batch), model drafters draft nothing and ``auto`` drafts n-grams only, against the
default plan's conservative verify curve: tokens come at once, drafts once the plan is ready.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quicksilver.runtime.draft_shape import DraftShape
from quicksilver.runtime.speculative.cost_plan import DraftPlan, default_plan
from quicksilver.runtime.speculative.ngram import ngram_draft
from quicksilver.runtime.speculative.plans import DraftPlans
from quicksilver.runtime.speculative.self_draft import (
    exit_draft,
    model_drafts,
    plane_shape,
    skip_layers,
)
from quicksilver.runtime.speculative.settings import MODEL_METHODS

if TYPE_CHECKING:  # types only: the step batch drives this module, never the reverse
    from quicksilver.runtime.cache import KVCache
    from quicksilver.runtime.engine import Engine
    from quicksilver.runtime.rows import Row, StepStats

Attribute = Callable[[list["Row"], list[int], dict[str, int]], dict[str, int]]

# Acceptance memory of auto: older evidence fades by this factor per update, so a row whose
# text stops repeating (or starts) is re-judged within a few steps.
DECAY = 0.8
PRIOR_TRIALS = 2.0
NGRAM_PRIOR = 0.5  # before a row has evidence, an n-gram match is as likely right as wrong
MARGIN = 1.02  # auto drafts only where the expected gain clears measurement noise


@dataclass
class Acceptance:
    """Decayed (accepted, tried) drafted-token counts of one method for one row."""

    prior: float
    accepted: float = 0.0
    tried: float = 0.0

    @property
    def rate(self) -> float:
        return (self.accepted + self.prior * PRIOR_TRIALS) / (self.tried + PRIOR_TRIALS)

    def update(self, accepted: int, drafted: int) -> None:
        # A draft is read left to right until its first miss: positions tried = accepted,
        # plus the one that missed (if any).
        self.accepted = self.accepted * DECAY + accepted
        self.tried = self.tried * DECAY + accepted + (1 if accepted < drafted else 0)

    def relax(self) -> None:
        """A step without this method's drafts: old evidence fades toward the prior, so a
        method switched off is tried again once its bad record is old."""
        self.accepted *= DECAY
        self.tried *= DECAY


@dataclass
class Choice:
    method: str | None = None
    length: int = 0
    draft: list[int] = field(default_factory=list)
    # auto with an n-gram match: the whole match and the row's acceptance rate, so the batch
    # can pick one width for every such row (``Drafter._share_width``)
    match: list[int] | None = None
    rate: float = 0.0


def expected_tokens(rate: float, length: int) -> float:
    """Tokens a verify step emits for a row drafting ``length`` tokens accepted at ``rate``."""
    return sum(rate**i for i in range(length + 1))


class Drafter:
    """Drafts for a StepBatch's running rows (see the module docstring)."""

    def __init__(self, engine: Engine, plans: DraftPlans, stats: StepStats) -> None:
        self.engine = engine
        self.plans = plans
        self.stats = stats
        self._plan: DraftPlan | None = None  # None while it is measured
        self._default = default_plan()
        self._shapes: dict[str, DraftShape] = {}
        self._acceptance: dict[int, dict[str, Acceptance]] = {}
        self.methods: dict[int, str | None] = {}  # the method each row drafted with last step

    def plan(self, calibration_prompt: tuple[int, ...]) -> DraftPlan | None:
        """The measured plan, or None while it is measured (begun here if nobody had: the
        batch runs its pieces, so this step does not wait for it)."""
        if self._plan is None:
            plans, engine = self.plans, self.engine
            self._plan = plans.ready(engine)
            if self._plan is None and plans.start(engine, calibration_prompt):
                self.stats.plan_notes.append(
                    "measuring the drafting plan in the background: model drafters wait for "
                    "it, auto drafts n-grams only until it is ready"
                )
        return self._plan

    @property
    def costs(self) -> DraftPlan:
        """What this step's choices follow: the measured plan, else the default."""
        return self._plan or self._default

    def shape(self, method: str) -> DraftShape:
        if method not in self._shapes:
            if method == "planes":
                self._shapes[method] = plane_shape(self.engine)
            else:
                plan, n_layers = self._plan, self.engine.config.n_layers
                self._shapes[method] = (
                    skip_layers(n_layers, plan.skipped_layers)
                    if plan.exit_layer is None
                    else exit_draft(n_layers, plan.exit_layer)
                )
        return self._shapes[method]

    def forget(self, row_id: int) -> None:
        self._acceptance.pop(row_id, None)
        self.methods.pop(row_id, None)

    # ------------------------------------------------------------ one step

    def drafts(
        self, rows: list[Row], cache: KVCache, room: int, attribute: Attribute
    ) -> list[list[int]]:
        """Each running row's drafted tokens for this step (``room``: slots left past the
        longest row, which bounds every draft). ``attribute``: the batch's split of a
        forward's FLOPs among the rows that fed it (passed per call: held, the batch's bound
        method would make a reference cycle, and a dropped batch's KV cache would stay in
        memory until the cyclic collector happened to run)."""
        n = len(rows)
        choices = [self._choose(row, n, room) for row in rows]
        if n > 1 and any(c.match for c in choices):
            self._share_width(choices, n)
        for method in MODEL_METHODS:
            users = [i for i, c in enumerate(choices) if c.method == method and c.length]
            if not users:
                continue
            last, k = users[-1] + 1, max(choices[i].length for i in users)
            shape = self.shape(method)
            engine, stats = self.engine, self.stats
            before = engine.counter.summary()
            start = time.perf_counter()
            guesses = model_drafts(
                engine, cache.rows(0, last), [r.tokens[-1] for r in rows[:last]], k, shape
            )
            stats.draft_seconds += time.perf_counter() - start
            spent = attribute(rows[:last], [k] * last, before)
            stats.draft_flops += spent["total"]
            for i in users:
                choices[i].draft = guesses[i][: choices[i].length]
        for row, choice in zip(rows, choices, strict=True):
            self.methods[row.id] = choice.method if choice.draft else None
        return [c.draft for c in choices]

    def _share_width(self, choices: list[Choice], n: int) -> None:
        """Every row of a step feeds as many tokens as the longest draft (shorter ones are
        padded and rolled back), so a width is a batch decision: cut auto's n-gram drafts to
        the width with the most expected tokens, summed over the rows, per unit of verify
        time at this batch size."""
        plan = self.costs
        flexible = [c for c in choices if c.match and c.method not in MODEL_METHODS]
        fixed = [c for c in choices if not (c.match and c.method not in MODEL_METHODS)]
        floor = max((c.length for c in fixed), default=0)
        # Rows whose drafts stay as they are: the rate auto measured, else an even chance.
        constant = sum(expected_tokens(c.rate if c.match else 0.5, c.length) for c in fixed)
        best_width, best_value = 0, -1.0
        for width in range(max(len(c.match) for c in flexible) + 1):
            tokens = constant + sum(
                expected_tokens(c.rate, min(width, len(c.match))) for c in flexible
            )
            value = tokens / plan.verify(n, max(width, floor))
            if value > best_value:
                best_width, best_value = width, value
        for c in flexible:
            c.length = min(best_width, len(c.match))
            c.draft = c.match[: c.length]
            c.method = "ngram" if c.length else None

    def record(self, row: Row, accepted: int, drafted: int) -> None:
        """What the verify forward kept of the row's draft (feeds auto's estimates)."""
        method = self.methods.get(row.id)
        if method is None or not drafted:
            return
        self._estimates(row)[method].update(accepted, drafted)
        counts = self.stats.by_method.setdefault(method, [0, 0, 0])
        counts[0] += 1
        counts[1] += drafted
        counts[2] += accepted

    def _estimates(self, row: Row) -> dict[str, Acceptance]:
        """The row's acceptance per method; model methods join once the plan gives their
        priors (measured agreements)."""
        estimates = self._acceptance.setdefault(row.id, {"ngram": Acceptance(NGRAM_PRIOR)})
        plan = self._plan
        if plan is not None and MODEL_METHODS[0] not in estimates:
            for method in MODEL_METHODS:
                estimates[method] = Acceptance(plan.agreement(method) or 0.0)
        return estimates

    def _choose(self, row: Row, n_rows: int, room: int) -> Choice:
        config = row.spec.speculative
        if config is None or row.remaining <= 1 or room <= 0:
            return Choice()
        limit = min(config.max_tokens, row.remaining - 1, room)
        method = config.method
        history = None
        if method in ("ngram", "auto"):
            history = list(row.spec.prompt) + row.tokens
        if method == "ngram":
            draft = ngram_draft(history, limit, config.max_ngram, config.min_ngram)
            return Choice("ngram", len(draft), draft)
        measured = self.plan(row.spec.prompt)
        plan = self.costs
        if method in MODEL_METHODS:
            if measured is None:
                if method == "planes":
                    self.shape(method)  # refused now if this model cannot draft with planes
                return Choice()  # plain decoding until the plan is measured
            if config.num_tokens is not None:
                return Choice(method, limit)
            self.shape(method)  # refuses a method this model or policy cannot draft with
            agreement, cost = plan.agreement(method), plan.draft_cost(method, n_rows)
            # An explicit method always drafts: at least one token, even where it loses.
            k, _ = plan.best_length(agreement, cost, n_rows, limit)
            return Choice(method, max(1, k))
        # auto
        estimates = self._estimates(row)
        best, gain = Choice(), MARGIN
        match = ngram_draft(history, limit, config.max_ngram, config.min_ngram)
        rate = estimates["ngram"].rate
        if match:
            k, expected = plan.best_length(rate, 0.0, n_rows, len(match))
            if expected > gain:
                best, gain = Choice("ngram", k, match[:k]), expected
        for method in MODEL_METHODS:
            cost = plan.draft_cost(method, n_rows)
            if cost is None:
                continue
            k, expected = plan.best_length(estimates[method].rate, cost, n_rows, limit)
            if expected > gain:
                best, gain = Choice(method, k), expected
        if best.method is None:
            for estimate in estimates.values():
                estimate.relax()
        if match and best.method not in MODEL_METHODS:
            best.match, best.rate = match, rate
        return best
