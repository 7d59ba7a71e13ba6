"""Drafting plans measured off the request path (``runtime.speculative.plans``).

A row that needs a plan nobody has measured decodes at once (plain, or n-grams for auto)
while every step runs one piece of the measurement; once the plan is ready, model drafters
draft. Greedy tokens equal plain decoding's throughout. A registry shared by two batches
measures once; plan files on disk are bounded, least recently used removed first.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from test_accounting import random_model
from test_policies import CONFIG, make_engine
from test_step_batch import alone, prompts

from quicksilver.api.drafting import PlanFiles, evict_plans
from quicksilver.runtime.batch import StepBatch
from quicksilver.runtime.rows import RowSpec
from quicksilver.runtime.speculative import DraftPlan, DraftPlans, SpeculativeConfig, cost_plan
from quicksilver.runtime.speculative.cost_plan import _REPEATS, default_plan

LAYERS = SpeculativeConfig(method="layers", num_tokens=2)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, fast=True)


@pytest.fixture(autouse=True)
def short_measurement(monkeypatch):
    """A smaller measurement (one batch size, a short continuation): the same pieces, fewer."""
    monkeypatch.setattr(cost_plan, "CURVE_ROWS", (1,))
    monkeypatch.setattr(cost_plan, "CALIBRATION_NEW_TOKENS", 6)


class Pieces:
    """Counts the measurement's forwards in each advance and the advances in each step."""

    def __init__(self, monkeypatch, engine) -> None:
        self.forwards = 0
        self.per_advance: list[int] = []
        self.advances = 0
        forward = engine.forward

        def counted(*args, **kwargs):
            self.forwards += 1
            return forward(*args, **kwargs)

        advance = cost_plan.PlanMeasurement.advance

        def watched(measurement, progress=None):
            self.advances += 1
            before = self.forwards
            result = advance(measurement, progress)
            self.per_advance.append(self.forwards - before)
            return result

        monkeypatch.setattr(engine, "forward", counted)
        monkeypatch.setattr(cost_plan.PlanMeasurement, "advance", watched)


def step_all(batch: StepBatch, pieces: Pieces | None = None, max_steps: int = 500):
    """Run ``batch`` to its end: tokens per row and, per row, the steps that gave it tokens."""
    tokens: dict[int, list[int]] = {}
    steps: dict[int, list[int]] = {}
    for step in range(max_steps):
        if not batch.has_work:
            break
        advances = pieces.advances if pieces is not None else 0
        for event in batch.step():
            tokens.setdefault(event.row, []).extend(event.tokens)
            if event.tokens:
                steps.setdefault(event.row, []).append(step)
        if pieces is not None:
            assert pieces.advances - advances <= 1  # one piece per step at most
    assert not batch.has_work
    return tokens, steps


def test_a_layers_row_decodes_at_once_and_drafts_once_the_plan_is_ready(model, monkeypatch) -> None:
    """A plain row decodes; a ``layers`` row joins: its first token comes in the step after
    its prompt, not after a measurement; each step runs one piece (one forward or one timed
    group); drafts start once the plan is measured, and every token is plain greedy's."""
    engine = make_engine(model, None)
    pieces = Pieces(monkeypatch, engine)
    plans = DraftPlans()
    batch = StepBatch(engine, max_rows=2, max_len=200, plans=plans)
    plain_text, drafted_text = prompts(4, [6, 5])
    plain = batch.admit(RowSpec(tuple(plain_text), 120))
    drafted = batch.admit(RowSpec(tuple(drafted_text), 120, speculative=LAYERS))
    tokens, steps = step_all(batch, pieces)
    # Prefilled together, then a token or more every step: nobody waits for the measurement.
    assert steps[drafted] == list(range(len(steps[drafted])))
    assert steps[plain] == list(range(len(steps[plain])))
    assert max(pieces.per_advance) <= _REPEATS + 1  # a piece: a forward or a timed group
    assert plans.ready(engine) is not None and plans.pending(engine) is None
    stats = batch.stats
    assert stats.calibration_seconds > 0 and len(stats.plan_notes) == 2
    assert stats.by_method["layers"][0] > 0  # drafted once the plan was there
    assert tokens[plain] == alone_long(model, plain_text, 120)
    assert tokens[drafted] == alone_long(model, drafted_text, 120)


def alone_long(model, prompt, new) -> list[int]:
    batch = StepBatch(make_engine(model, None), max_rows=1, max_len=200)
    row = batch.admit(RowSpec(tuple(prompt), new))
    return step_all(batch)[0][row]


def test_auto_drafts_ngrams_only_while_the_plan_is_measured(model) -> None:
    """auto before the plan: n-gram drafts against the default verify curve, no model draft;
    output equal to plain greedy's."""
    engine = make_engine(model, None)
    batch = StepBatch(engine, max_rows=1, max_len=64)
    text = prompts(8, [4])[0] * 4
    row = batch.admit(RowSpec(tuple(text), 8, speculative=SpeculativeConfig(method="auto")))
    tokens, _ = step_all(batch)
    assert tokens[row] == alone(model, None, text, 8)
    assert set(batch.stats.by_method) <= {"ngram"} and batch.stats.draft_flops == 0
    assert batch.plans.pending(engine) is not None  # still measuring when the row ended
    plan = default_plan()
    assert plan.draft_cost("layers", 1) is None and plan.draft_cost("planes", 1) is None


def test_two_batches_sharing_the_registry_measure_once(model, monkeypatch) -> None:
    engine = make_engine(model, None)
    plans = DraftPlans()
    started = []
    start = plans.start
    monkeypatch.setattr(plans, "start", lambda *a: started.append(start(*a)) or started[-1])
    batches = [StepBatch(engine, max_rows=1, max_len=200, plans=plans) for _ in range(2)]
    for batch, text in zip(batches, prompts(6, [5, 7]), strict=True):
        batch.admit(RowSpec(tuple(text), 100, speculative=LAYERS))
    while any(b.has_work for b in batches):
        for batch in batches:
            if batch.has_work:
                batch.step()
    assert started.count(True) == 1
    assert all(b.stats.by_method.get("layers", [0])[0] > 0 for b in batches)


def test_measure_runs_a_pending_measurement_to_its_end(model, capsys) -> None:
    """The synchronous call finishes what steps began; without a progress callback it says
    so in one line on stderr."""
    engine = make_engine(model, None)
    plans = DraftPlans()
    assert plans.start(engine, prompts(2, [6])[0])
    plans.advance(engine)
    plan = plans.measure(engine, [1])
    assert isinstance(plan, DraftPlan) and plan.seconds > 0 and plan.skipped_layers
    assert plans.pending(engine) is None and plans.measure(engine, [1]) is plan
    assert capsys.readouterr().err.count("\n") == 1
    heard: list[str] = []
    DraftPlans().measure(engine, prompts(2, [6])[0], heard.append)
    assert len(heard) > 2 and not capsys.readouterr().err


def test_plan_files_are_bounded_least_recently_used_first(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QUICKSILVER_CACHE", str(tmp_path))
    llm = SimpleNamespace(
        source=SimpleNamespace(kind="hf", path="nowhere"), dtype="float32", weights="dense"
    )
    files = PlanFiles(llm)
    plan = default_plan()
    for i in range(3):
        files.save(f"policy {i}", plan)
    directory = tmp_path / "drafting"
    paths = {i: directory / os.path.basename(files.location(f"policy {i}")) for i in range(3)}
    for age, i in enumerate([0, 1, 2]):  # policy 0 oldest
        os.utime(paths[i], ns=(10**9 * (age + 1), 10**9 * (age + 1)))
    assert files.load("policy 0") == plan  # read: now the most recently used
    evict_plans(directory, keep=2)
    assert paths[0].exists() and not paths[1].exists() and paths[2].exists()
    for i in range(3, 20):
        files.save(f"policy {i}", plan)
    assert len(list(directory.glob("*.json"))) == 16


def test_a_measurement_that_fails_between_steps_fails_no_row(model, monkeypatch) -> None:
    """The rows go on (n-grams only from then on); the failure is noted, never retried at
    every step."""
    engine = make_engine(model, None)
    calls = []

    def broken(measurement, progress=None):
        calls.append(1)
        raise RuntimeError("a damaged timer")

    monkeypatch.setattr(cost_plan.PlanMeasurement, "advance", broken)
    plans = DraftPlans()
    batch = StepBatch(engine, max_rows=2, max_len=200, plans=plans)
    text = prompts(5, [6])[0]
    row = batch.admit(RowSpec(tuple(text), 30, speculative=LAYERS))
    tokens, _ = step_all(batch)
    assert tokens[row] == alone_long(model, text, 30)
    assert calls == [1]
    assert any("failed (RuntimeError: a damaged timer)" in n for n in batch.stats.plan_notes)
    assert plans.ready(engine) == default_plan()
