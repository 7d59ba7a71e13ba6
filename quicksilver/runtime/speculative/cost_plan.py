"""What drafting costs and earns on this machine: the plan every model drafter and ``auto``
follow, measured once per model, format, policy and machine (``speculative.plans`` keeps it;
the API's store keeps it on disk).

Measured, not assumed:

- the verify cost curve: the time of a forward of k + 1 tokens per row over the time of a
  one-token step, for k = 0..``MAX_DRAFT_TOKENS``, at a few batch sizes. Weight-only kernels
  make this curve machine- and format-specific (an int4 kernel loses beyond a few rows, an
  emulated bf16 product grows with every row), so draft lengths follow it;
- for each self-draft (``layers``, ``planes``): its step time over the full step's, and its
  agreement, the fraction of the model's own greedy tokens its argmax reproduces under teacher
  forcing (on a calibration text the model continued itself, where drafts will be used).

Which layers ``layers`` skips: each layer's agreement when skipped alone orders them (as
SWIFT and Draft & Verify search a frozen model's skippable layers); nested sets of the
least harmful ones are measured whole, and the set with the most expected tokens per unit of
time wins. A contiguous SkipDecode block was measured too and agrees far less (it skips layers
the model cannot spare), so the search is over single layers. A model with fitted exit heads
(``quicksilver.adapt.exits``) also has early exits measured, the same numbers of top layers
left out and the last state read through its layer's head; whichever set wins is the plan's
``layers`` draft (``exit_layer`` says when it is an early exit).

Expected tokens per unit of time of a draft of k tokens with per-token agreement a and draft
step cost c (in full steps): ``(1 + a + a^2 + ... + a^k) / (k * c + verify(k))`` against 1 for
plain decoding (a geometric acceptance model, as in the speculative decoding papers).

Measuring takes tens of seconds, so ``measurement`` does it in pieces: each advance of its
generator runs one forward or one small timed group, and a step batch can interleave the
pieces with its own steps (``speculative.plans``); ``calibrate`` runs them all at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from quicksilver.errors import QuicksilverError
from quicksilver.runtime.draft_shape import DraftShape
from quicksilver.runtime.sampling import greedy_tokens
from quicksilver.runtime.speculative.self_draft import exit_draft, plane_shape, skip_layers
from quicksilver.runtime.speculative.settings import MAX_DRAFT_TOKENS

if TYPE_CHECKING:
    from quicksilver.runtime.cache import KVCache
    from quicksilver.runtime.engine import Engine

PLAN_VERSION = 3  # 3: cheaper verify forwards, and the step timed twice (_verify_curve)
CURVE_ROWS = (1, 4, 8)  # batch sizes the verify curve is measured at
CALIBRATION_NEW_TOKENS = 48
CALIBRATION_PROMPT_TOKENS = 64  # the calibration text's last tokens the model continues
_CONTEXT = 96  # cached tokens behind each timed forward
_REPEATS = 3
# Before a plan is measured: verifying k drafted tokens is assumed to cost 1 + 0.1 k steps, a
# curve every format measured so far stays under at one row (docs/results/verify-cost.md).
DEFAULT_VERIFY_SLOPE = 0.1


@dataclass
class DraftPlan:
    """Measured costs and agreements (see the module docstring); JSON-friendly."""

    rows: list[int]
    verify_cost: list[list[float]]  # [rows index][k]: time(k + 1 tokens) / time(1 token)
    skipped_layers: list[int] = field(default_factory=list)
    layers_agreement: float = 0.0
    layers_cost: list[float] = field(default_factory=list)  # [rows index]: draft / full step
    exit_layer: int | None = None  # ``layers`` is an early exit through this layer's head
    planes_agreement: float | None = None
    planes_cost: list[float] | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)  # layer sets measured
    seconds: float = 0.0  # what measuring took
    version: int = PLAN_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DraftPlan:
        if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
            raise QuicksilverError("a drafting plan from another version")
        plan = cls(**data)
        if len(plan.verify_cost) != len(plan.rows) or not all(
            len(curve) == MAX_DRAFT_TOKENS + 1 for curve in plan.verify_cost
        ):
            raise QuicksilverError("a drafting plan with a malformed verify curve")
        return plan

    def _at(self, values: list, rows: int):
        """The entry measured at the batch size nearest ``rows``."""
        index = min(range(len(self.rows)), key=lambda i: abs(self.rows[i] - rows))
        return values[index]

    def verify(self, rows: int, k: int) -> float:
        """Cost of verifying k drafted tokens per row, in one-token steps."""
        return self._at(self.verify_cost, rows)[min(k, MAX_DRAFT_TOKENS)]

    def draft_cost(self, method: str, rows: int) -> float | None:
        """One draft step of ``method`` in full steps (0 for ngram; None if unmeasured)."""
        if method == "ngram":
            return 0.0
        costs = self.layers_cost if method == "layers" else self.planes_cost
        return self._at(costs, rows) if costs else None

    def agreement(self, method: str) -> float | None:
        if method == "layers":
            return self.layers_agreement if self.layers_cost else None
        if method == "planes":
            return self.planes_agreement
        return None

    def best_length(
        self, agreement: float, draft_cost: float, rows: int, limit: int
    ) -> tuple[int, float]:
        """(k, expected speedup over plain decoding) for the best k in 1..limit."""
        best = (0, 1.0)
        for k in range(1, min(limit, MAX_DRAFT_TOKENS) + 1):
            gain = expected_speedup(agreement, draft_cost, self.verify(rows, k), k)
            if gain > best[1]:
                best = (k, gain)
        return best


def expected_speedup(agreement: float, draft_cost: float, verify_cost: float, k: int) -> float:
    """Tokens per unit of time of a k-token draft over plain decoding's (module docstring)."""
    tokens = sum(agreement**i for i in range(k + 1))
    return tokens / (k * draft_cost + verify_cost)


# ---------------------------------------------------------------- measuring

# What a measurement's generator yields: a stage's message before its work, None after each
# piece of work (one forward or one timed group); it returns the plan.
Pieces = Generator[str | None, None, DraftPlan]


def default_plan() -> DraftPlan:
    """The plan to follow while the real one is measured: a conservative verify curve and no
    model drafter (``draft_cost`` is None for both), so only n-gram drafts run."""
    curve = [1.0 + DEFAULT_VERIFY_SLOPE * k for k in range(MAX_DRAFT_TOKENS + 1)]
    return DraftPlan(rows=[1], verify_cost=[curve], layers_cost=[])


class _Clock:
    """Times forwards behind ``_CONTEXT`` cached tokens, one prefilled cache per batch size
    (each timed block is rolled back, so every forward sees the same context)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.caches: dict[int, KVCache] = {}
        self.generator = torch.Generator().manual_seed(0)
        self.last = 0.0  # the result of the latest ``seconds``

    def seconds(self, rows: int, n_new: int, shape: DraftShape | None = None) -> Generator[None]:
        """Fastest of a few forwards of ``n_new`` tokens per row, left in ``last``: what the
        work costs here. (Noise on a shared machine only ever adds time; a median of three
        still took a neighbour's burst for a 15x "cost" of a 2-token forward.) Yields after
        filling a new batch size's cache and after the timed group."""
        engine, vocab = self.engine, self.engine.config.vocab_size
        cache = self.caches.get(rows)
        if cache is None:
            cache = self.caches[rows] = engine.new_cache(rows, _CONTEXT + MAX_DRAFT_TOKENS + 2)
            cache.set_prompt_end(0)
            engine.forward(torch.randint(vocab, (rows, _CONTEXT), generator=self.generator), cache)
            yield
        block = torch.randint(vocab, (rows, n_new), generator=self.generator)
        logits_at = "last" if shape is not None or n_new == 1 else "all"
        times = []
        for _ in range(_REPEATS + 1):  # the first warms this shape up
            start = time.perf_counter()
            engine.forward(block, cache, logits_at=logits_at, draft=shape)
            times.append(time.perf_counter() - start)
            cache.truncate(n_new)
        self.last = min(times[1:])
        yield

    def relative_cost(self, rows: list[int], shape: DraftShape) -> Generator[None, None, list]:
        """Per batch size: a ``shape`` step's time over a full step's."""
        costs = []
        for r in rows:
            yield from self.seconds(r, 1, shape)
            drafted = self.last
            yield from self.seconds(r, 1)
            costs.append(drafted / self.last)
        return costs


class _Judge:
    """Agreement of a self-draft with the model's own greedy continuation of the prompt:
    position p's argmax predicts text[p + 1]; only the generated part is scored."""

    def __init__(self, engine: Engine, prompt: list[int], generated: list[int]) -> None:
        self.engine = engine
        self.text = prompt + generated[:-1]
        self.targets = torch.tensor(generated, dtype=torch.long)
        self.first = len(prompt) - 1

    def agreement(self, shape: DraftShape) -> float:
        """One teacher-forced forward of the text under ``shape`` (from an empty cache)."""
        engine = self.engine
        cache = engine.new_cache(1, len(self.text))
        cache.set_prompt_end(0)
        block = torch.tensor([self.text], dtype=torch.long)
        logits = engine.forward(block, cache, logits_at="all", draft=shape)[0]
        guess = greedy_tokens(logits)[self.first :]
        return float((guess == self.targets).float().mean())


def _greedy(engine: Engine, prompt: list[int], new_tokens: int) -> Generator[None, None, list]:
    """The model's own greedy continuation, one forward per piece (stop tokens ignored: the
    text is for judging drafts, not for reading)."""
    cache = engine.new_cache(1, len(prompt) + new_tokens)
    cache.set_prompt_end(len(prompt))
    logits = engine.forward(torch.tensor([prompt], dtype=torch.long), cache)
    tokens = [int(greedy_tokens(logits[0]))]
    while len(tokens) < new_tokens:
        yield
        logits = engine.forward(torch.tensor([[tokens[-1]]], dtype=torch.long), cache)
        tokens.append(int(greedy_tokens(logits[0])))
    yield
    return tokens


def _verify_curve(clock: _Clock, rows: list[int]) -> Generator[None, None, list]:
    """Per batch size: the time of k + 1 tokens per row over one token's, k = 0..max. The
    one-token step is timed before the others and again after them, and the faster kept: the
    first forwards over a freshly filled cache run slow (compiled int4 steps measured 3.9,
    3.6, 3.4, then 3.2 ms), which had priced forwards of 2..7 tokens below one step."""
    curves = []
    for r in rows:
        yield from clock.seconds(r, 1)
        before, times = clock.last, []
        for k in range(1, MAX_DRAFT_TOKENS + 1):
            yield from clock.seconds(r, k + 1)
            times.append(clock.last)
        yield from clock.seconds(r, 1)
        step = min(before, clock.last)
        curves.append([1.0] + [t / step for t in times])
    return curves


def _skip_search(plan: DraftPlan, judge: _Judge, clock: _Clock) -> Generator[None]:
    """Order layers by their agreement when skipped alone, measure nested sets of the least
    harmful ones and keep, in ``plan``, the set with the most expected tokens per unit of
    time at batch 1 (where drafting pays most)."""
    n_layers = judge.engine.config.n_layers
    alone = []
    for layer in range(n_layers):
        alone.append(judge.agreement(skip_layers(n_layers, [layer])))
        yield
    order = sorted(range(n_layers), key=lambda layer: -alone[layer])
    sizes = sorted({max(1, round(n_layers * f)) for f in (0.1, 0.2, 0.3, 0.4, 0.5)})
    shapes = [skip_layers(n_layers, sorted(order[:size])) for size in sizes]
    if judge.engine.model.exit_heads is not None and n_layers > 1:
        shapes += [exit_draft(n_layers, n_layers - 1 - min(s, n_layers - 1)) for s in sizes]
    best: tuple[float, dict[str, Any]] | None = None
    for shape in shapes:
        candidate = yield from _candidate(plan, judge, clock, shape)
        plan.candidates.append(candidate)
        if best is None or candidate["expected_speedup"] > best[0]:
            best = (candidate["expected_speedup"], candidate)
    chosen = best[1]
    plan.skipped_layers = chosen["skipped"]
    plan.layers_agreement = chosen["agreement"]
    plan.layers_cost = chosen["cost"]
    plan.exit_layer = chosen.get("exit_layer")


def _candidate(
    plan: DraftPlan, judge: _Judge, clock: _Clock, shape: DraftShape
) -> Generator[None, None, dict[str, Any]]:
    """One layer set's agreement, step cost and best draft length at batch 1."""
    n_layers = judge.engine.config.n_layers
    skipped = sorted(set(range(n_layers)) - shape.layers)
    candidate: dict[str, Any] = {"skipped": skipped, "agreement": judge.agreement(shape)}
    if shape.exit_layer is not None:
        candidate["exit_layer"] = shape.exit_layer
    yield
    candidate["cost"] = yield from clock.relative_cost(plan.rows, shape)
    k, gain = plan.best_length(candidate["agreement"], candidate["cost"][0], 1, MAX_DRAFT_TOKENS)
    candidate.update(num_tokens=k, expected_speedup=gain)
    return candidate


def measurement(engine: Engine, prompt: Sequence[int]) -> Pieces:
    """Measure the plan for ``engine`` under its current policy, piece by piece (see the
    module docstring). ``prompt``: calibration text the model continues greedily; agreement
    is measured on that continuation. ``PlanMeasurement`` runs the pieces (in inference mode)
    and sets ``seconds``: only it knows how long they took, spread over other work."""
    prompt = list(prompt)[-CALIBRATION_PROMPT_TOKENS:]
    if not prompt:
        raise QuicksilverError("a drafting plan needs a calibration text of at least one token")
    clock = _Clock(engine)
    rows = list(CURVE_ROWS)
    yield "drafting plan: the verify cost curve"
    plan = DraftPlan(rows=rows, verify_cost=(yield from _verify_curve(clock, rows)))
    yield "drafting plan: the model's own continuation of the calibration text"
    generated = yield from _greedy(engine, prompt, CALIBRATION_NEW_TOKENS)
    judge = _Judge(engine, prompt, generated)
    yield f"drafting plan: {engine.config.n_layers} layers skipped one at a time"
    yield from _skip_search(plan, judge, clock)
    try:
        shape = plane_shape(engine)
    except QuicksilverError:
        shape = None
    if shape is not None:
        yield "drafting plan: the 4-bit plane draft"
        plan.planes_agreement = judge.agreement(shape)
        yield
        plan.planes_cost = yield from clock.relative_cost(rows, shape)
    return plan


class PlanMeasurement:
    """One plan being measured a piece at a time (``measurement``): whoever holds it decides
    when the next piece runs, so the work can sit between other forwards."""

    def __init__(self, engine: Engine, prompt: Sequence[int]) -> None:
        self.engine = engine
        self.plan: DraftPlan | None = None
        self.seconds = 0.0  # time spent in pieces so far
        self.stage = ""  # the latest stage's message
        self._pieces = measurement(engine, prompt)

    @property
    def done(self) -> bool:
        return self.plan is not None

    def advance(self, progress: Callable[[str], None] | None = None) -> bool:
        """Run one piece (stage messages met on the way go to ``progress``); True once the
        plan is measured."""
        if self.plan is not None:
            return True
        start = time.perf_counter()
        with torch.inference_mode():
            try:
                while (message := next(self._pieces)) is not None:
                    self.stage = message
                    if progress is not None:
                        progress(message)
            except StopIteration as finished:
                self.plan = finished.value
        self.seconds += time.perf_counter() - start
        if self.plan is not None:
            self.plan.seconds = self.seconds
        return self.plan is not None

    def finish(self, progress: Callable[[str], None] | None = None) -> DraftPlan:
        """The remaining pieces at once."""
        while not self.advance(progress):
            pass
        return self.plan


def calibrate(
    engine: Engine, prompt: Sequence[int], progress: Callable[[str], None] | None = None
) -> DraftPlan:
    """The whole measurement at once; ``progress(message)`` hears each stage."""
    return PlanMeasurement(engine, prompt).finish(progress)
