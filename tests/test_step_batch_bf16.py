"""Continuous batching in bfloat16: a row that joins and leaves a running batch gets the tokens
it gets alone, except where bf16 itself cannot tell the two best tokens apart.

In fp32 the match is exact (``test_step_batch``). In bf16 a row's sums run in a different
order beside other rows, so a logit can move by a rounding step; the rule allows a different
token only at a position where the alone run's two best logits are at most one bf16 step
apart (the gap taken in float32 from the alone run's own logits). After that position the
two runs continue different texts, so the rest of that row is not compared.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_policies import CONFIG, MATRIX, make_engine
from test_step_batch import STAGGERED_BUDGETS, STAGGERED_TEXTS, run_all, staggered

from quicksilver.models.loading import build_model
from quicksilver.models.transformer import Transformer
from quicksilver.runtime.batch import RowSpec, StepBatch

BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7: the step between 1 and the next bf16


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    shapes = {k: v.shape for k, v in Transformer(CONFIG).state_dict().items()}
    state = {k: torch.randn(s) * 0.1 for k, s in shapes.items() if k != "lm_head.weight"}
    return build_model(CONFIG, state, torch.bfloat16, fast=True)


def bf16_step(value: float) -> float:
    """The distance from ``value`` to the next bf16 number away from zero."""
    magnitude = abs(value)
    if magnitude == 0:
        return torch.finfo(torch.bfloat16).smallest_normal
    return BF16_EPS * 2.0 ** math.floor(math.log2(magnitude))


def alone_with_gaps(
    model: Transformer, policy: dict | None, prompt: list[int], new: int
) -> tuple[list[int], list[tuple[float, float]]]:
    """The row's greedy tokens alone, and at each of them the float32 gap between the two
    best logits beside one bf16 step at the best logit's size."""
    seen: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(
        lambda module, args, out: seen.append(out.reshape(-1, out.shape[-1])[-1].float())
    )
    try:
        batch = StepBatch(make_engine(model, policy), max_rows=1, max_len=64)
        row = batch.admit(RowSpec(tuple(prompt), new))
        tokens = run_all(batch)[row]
    finally:
        hook.remove()
    assert len(seen) == len(tokens), "one head call per token alone (no chunks, no drafts)"
    gaps = []
    for logits in seen:
        best, second = logits.topk(2).values.tolist()
        gaps.append((best - second, bf16_step(best)))
    return tokens, gaps


def first_unexplained_difference(
    got: list[int], tokens: list[int], gaps: list[tuple[float, float]]
) -> str | None:
    """None when ``got`` equals the alone ``tokens`` up to the first position where they
    differ and that position's gap is within one bf16 step; otherwise what went wrong."""
    if len(got) != len(tokens):
        return f"{len(got)} tokens, {len(tokens)} alone"
    for position, (mine, theirs) in enumerate(zip(got, tokens, strict=True)):
        if mine != theirs:
            gap, step = gaps[position]
            if gap <= step:
                return None  # a near tie: from here on the texts differ by right
            return f"position {position}: {mine} != {theirs}, top-2 gap {gap:.4g} > {step:.4g}"
    return None


def test_the_rule_rejects_a_difference_at_a_clear_winner() -> None:
    gaps = [(0.5, 0.0078), (0.001, 0.0078), (0.5, 0.0078)]
    assert first_unexplained_difference([1, 2, 3], [1, 2, 3], gaps) is None
    assert first_unexplained_difference([1, 9, 7], [1, 2, 3], gaps) is None  # a near tie
    assert "position 0" in first_unexplained_difference([4, 2, 3], [1, 2, 3], gaps)
    assert "position 2" in first_unexplained_difference([1, 2, 4], [1, 2, 3], gaps)
    assert bf16_step(1.0) == 2**-7 and bf16_step(-3.0) == 2**-6


@pytest.mark.parametrize("name", [None, *MATRIX])
def test_a_row_admitted_while_others_run_gets_its_tokens_alone_in_bf16(model, name) -> None:
    policy = None if name is None else MATRIX[name]
    got = staggered(StepBatch(make_engine(model, policy), max_rows=2, max_len=40, prefill_tokens=8))
    for i, prompt in enumerate(STAGGERED_TEXTS):
        tokens, gaps = alone_with_gaps(model, policy, prompt, STAGGERED_BUDGETS[i])
        problem = first_unexplained_difference(got[i], tokens, gaps)
        assert problem is None, f"row {i} under {name}: {problem}"
