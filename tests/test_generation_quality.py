"""Generation-quality measures: the metrics on known cases, and a dense "policy" agreeing with
dense generation exactly."""

from __future__ import annotations

import pytest
import torch
from test_accounting import random_model
from test_policies import CONFIG, MATRIX

from quicksilver.errors import QuicksilverError
from quicksilver.eval.generation import (
    DenseReference,
    agreement,
    evaluate_generation,
    lcs_length,
    rouge_l,
    wikitext_prompts,
)
from quicksilver.policies import Policy


def test_metrics_on_known_cases() -> None:
    assert lcs_length([1, 2, 3, 4], [2, 4, 5]) == 2
    assert lcs_length([], [1]) == 0
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l([1, 2], [3, 4]) == 0.0
    assert rouge_l([1, 2, 3, 4], [2, 4]) == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert rouge_l([], []) == 1.0
    assert agreement([1, 2, 3], [1, 5, 3]) == pytest.approx(2 / 3)
    assert agreement([1], [1, 2]) == 0.5


def test_wikitext_prompts_take_first_sentences_of_body_paragraphs() -> None:
    text = (
        " = Title = \n\n A first paragraph has words enough. And more.\n\n"
        " = = Section = = \n\n Too short.\n\n Another body paragraph starts here ! Then.\n"
    )
    assert wikitext_prompts(text, 5) == [
        "A first paragraph has words enough.",
        "Another body paragraph starts here !",
    ]
    assert wikitext_prompts(text, 1) == ["A first paragraph has words enough."]


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, fast=True)


PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]


def test_dense_policy_agrees_exactly(model) -> None:
    result = evaluate_generation(model, Policy(), PROMPTS, max_new_tokens=6, batch_size=2)
    assert result.agreement == 1.0 and result.rouge_l == 1.0
    assert result.dense_ppl_of_policy == pytest.approx(result.dense_ppl_of_dense)
    assert result.policy_flops_per_token == pytest.approx(result.dense_flops_per_token)


def test_an_acting_policy_is_measured(model) -> None:
    policy = Policy.from_config(MATRIX["halt_skip"])
    result = evaluate_generation(model, policy, PROMPTS, max_new_tokens=6, batch_size=3)
    assert result.policy_flops_per_token < result.dense_flops_per_token
    assert result.policy_prefill_flops_per_token < result.dense_prefill_flops_per_token
    assert 0 <= result.agreement <= 1 and 0 <= result.rouge_l <= 1
    assert result.dense_ppl_of_policy > 0 and result.prompts == 3


def test_bad_input(model) -> None:
    with pytest.raises(QuicksilverError, match="no prompts"):
        evaluate_generation(model, Policy(), [], max_new_tokens=2)
    with pytest.raises(QuicksilverError, match="at least 2 new tokens"):
        evaluate_generation(model, Policy(), PROMPTS, max_new_tokens=1)
    with pytest.raises(QuicksilverError, match="batch size must be at least 1"):
        evaluate_generation(model, Policy(), PROMPTS, batch_size=0)


def test_dense_nll_matches_a_direct_computation(model) -> None:
    from quicksilver.eval.generation import dense_nll
    from quicksilver.runtime.engine import Engine

    engine = Engine(model)
    prompt, continuation = [5, 6, 7], [8, 9]
    tokens = torch.tensor([prompt + continuation])
    logits = engine.forward(tokens, engine.new_cache(1, 5), logits_at="all")[0, 2:4].float()
    expected = -torch.log_softmax(logits, -1)[[0, 1], [8, 9]].sum()
    assert dense_nll(engine, prompt, continuation) == pytest.approx(float(expected), rel=1e-5)


def test_another_model_is_judged_against_the_reference(model) -> None:
    """``measure(policy, model=...)``: the other model generates; the reference's model scores."""
    reference = DenseReference(model, PROMPTS, max_new_tokens=6, batch_size=2)
    other = random_model(CONFIG, fast=False)  # the same weights, then moved
    with torch.no_grad():
        for parameter in other.blocks.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    same = reference.measure(None)
    moved = reference.measure(None, model=other)
    assert same.agreement == 1.0 and same.dense_ppl_of_policy == pytest.approx(reference.ppl)
    assert moved.agreement < 1.0 and moved.dense_ppl_of_policy > reference.ppl
