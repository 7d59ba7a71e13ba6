"""What drafting costs and earns on this machine: the plan every model drafter and ``auto``
follow, measured once per model, format, policy and machine (the API caches it on disk).

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
the model cannot spare), so the search is over single layers.

Expected tokens per unit of time of a draft of k tokens with per-token agreement a and draft
step cost c (in full steps): ``(1 + a + a^2 + ... + a^k) / (k * c + verify(k))`` against 1 for
plain decoding (a geometric acceptance model, as in the speculative decoding papers).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from quicksilver.errors import QuicksilverError
from quicksilver.runtime.drafting import MAX_DRAFT_TOKENS
from quicksilver.runtime.self_draft import DraftShape, plane_shape, skip_layers

if TYPE_CHECKING:
    from quicksilver.runtime.cache import KVCache
    from quicksilver.runtime.engine import Engine

PLAN_VERSION = 1
CURVE_ROWS = (1, 4, 8)  # batch sizes the verify curve is measured at
CALIBRATION_NEW_TOKENS = 48
CALIBRATION_PROMPT_TOKENS = 64  # the calibration text's last tokens the model continues
_CONTEXT = 96  # cached tokens behind each timed forward
_REPEATS = 3


@dataclass
class DraftPlan:
    """Measured costs and agreements (see the module docstring); JSON-friendly."""

    rows: list[int]
    verify_cost: list[list[float]]  # [rows index][k]: time(k + 1 tokens) / time(1 token)
    skipped_layers: list[int] = field(default_factory=list)
    layers_agreement: float = 0.0
    layers_cost: list[float] = field(default_factory=list)  # [rows index]: draft / full step
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


class _Clock:
    """Times forwards behind ``_CONTEXT`` cached tokens, one prefilled cache per batch size
    (each timed block is rolled back, so every forward sees the same context)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.caches: dict[int, KVCache] = {}
        self.generator = torch.Generator().manual_seed(0)

    def seconds(self, rows: int, n_new: int, shape: DraftShape | None = None) -> float:
        """Fastest of a few forwards of ``n_new`` tokens per row: what the work costs here.
        (Noise on a shared machine only ever adds time; a median of three still took a
        neighbour's burst for a 15x "cost" of a 2-token forward.)"""
        engine, vocab = self.engine, self.engine.config.vocab_size
        cache = self.caches.get(rows)
        if cache is None:
            cache = self.caches[rows] = engine.new_cache(rows, _CONTEXT + MAX_DRAFT_TOKENS + 2)
            cache.set_prompt_end(0)
            engine.forward(torch.randint(vocab, (rows, _CONTEXT), generator=self.generator), cache)
        block = torch.randint(vocab, (rows, n_new), generator=self.generator)
        logits_at = "last" if shape is not None or n_new == 1 else "all"
        times = []
        for _ in range(_REPEATS + 1):  # the first warms this shape up
            start = time.perf_counter()
            engine.forward(block, cache, logits_at=logits_at, draft=shape)
            times.append(time.perf_counter() - start)
            cache.truncate(n_new)
        return min(times[1:])


def _teacher_forced(
    engine: Engine, tokens: Sequence[int], shape: DraftShape | None
) -> torch.Tensor:
    """The argmax after every position of ``tokens`` (one forward, from an empty cache)."""
    cache = engine.new_cache(1, len(tokens))
    cache.set_prompt_end(0)
    block = torch.tensor([list(tokens)], dtype=torch.long)
    return engine.forward(block, cache, logits_at="all", draft=shape)[0].argmax(dim=-1)


def _greedy(engine: Engine, prompt: list[int], new_tokens: int) -> list[int]:
    """The model's own greedy continuation (stop tokens ignored: the text is for judging
    drafts, not for reading)."""
    cache = engine.new_cache(1, len(prompt) + new_tokens)
    cache.set_prompt_end(len(prompt))
    logits = engine.forward(torch.tensor([prompt], dtype=torch.long), cache)
    tokens = [int(logits[0].argmax())]
    while len(tokens) < new_tokens:
        logits = engine.forward(torch.tensor([[tokens[-1]]], dtype=torch.long), cache)
        tokens.append(int(logits[0].argmax()))
    return tokens


def calibrate(engine: Engine, prompt: Sequence[int], progress=None) -> DraftPlan:
    """Measure the plan for ``engine`` under its current policy (see the module docstring).
    ``prompt``: calibration text the model continues greedily; its agreement is measured on
    that continuation. ``progress(message)`` hears each stage."""
    say = progress or (lambda message: None)
    prompt = list(prompt)[-CALIBRATION_PROMPT_TOKENS:]
    if not prompt:
        raise QuicksilverError("a drafting plan needs a calibration text of at least one token")
    start = time.perf_counter()
    n_layers = engine.config.n_layers
    say("drafting plan: the verify cost curve")
    rows = list(CURVE_ROWS)
    clock = _Clock(engine)
    with torch.inference_mode():
        steps = {r: clock.seconds(r, 1) for r in rows}
        curves = [
            [1.0] + [clock.seconds(r, k + 1) / steps[r] for k in range(1, MAX_DRAFT_TOKENS + 1)]
            for r in rows
        ]
        plan = DraftPlan(rows=rows, verify_cost=curves)

        say("drafting plan: the model's own continuation of the calibration text")
        generated = _greedy(engine, prompt, CALIBRATION_NEW_TOKENS)
        text = prompt + generated[:-1]
        # Position p's argmax predicts text[p + 1]; score the generated part only.
        targets = torch.tensor(generated, dtype=torch.long)
        first = len(prompt) - 1

        def agreement(shape: DraftShape) -> float:
            guess = _teacher_forced(engine, text, shape)[first:]
            return float((guess == targets).float().mean())

        def step_cost(shape: DraftShape) -> list[float]:
            return [clock.seconds(r, 1, shape) / clock.seconds(r, 1) for r in rows]

        say(f"drafting plan: {n_layers} layers skipped one at a time")
        alone = [agreement(skip_layers(n_layers, [layer])) for layer in range(n_layers)]
        order = sorted(range(n_layers), key=lambda layer: -alone[layer])
        best: tuple[float, dict[str, Any]] | None = None
        for size in sorted({max(1, round(n_layers * f)) for f in (0.1, 0.2, 0.3, 0.4, 0.5)}):
            skipped = sorted(order[:size])
            shape = skip_layers(n_layers, skipped)
            candidate = {
                "skipped": skipped,
                "agreement": agreement(shape),
                "cost": step_cost(shape),
            }
            # Chosen at batch 1, where drafting pays most.
            k, gain = plan.best_length(
                candidate["agreement"], candidate["cost"][0], 1, MAX_DRAFT_TOKENS
            )
            candidate.update(num_tokens=k, expected_speedup=gain)
            plan.candidates.append(candidate)
            if best is None or gain > best[0]:
                best = (gain, candidate)
        chosen = best[1]
        plan.skipped_layers = chosen["skipped"]
        plan.layers_agreement = chosen["agreement"]
        plan.layers_cost = chosen["cost"]

        try:
            shape = plane_shape(engine)
        except QuicksilverError:
            shape = None
        if shape is not None:
            say("drafting plan: the 4-bit plane draft")
            plan.planes_agreement = agreement(shape)
            plan.planes_cost = step_cost(shape)
    plan.seconds = time.perf_counter() - start
    return plan
