"""Policies inside batched generation with a KV cache: each row's output does not depend on the
other rows, and teacher-forced logits equal token-by-token decoding wherever the definition
allows it (every policy but fusion, which only sees the states of tokens in the same forward
block: a lone decoded token has no neighbour to compare with, so it never folds)."""

from __future__ import annotations

import pytest
import torch
from test_accounting import random_model
from test_policies import CONFIG, MATRIX, make_engine

from quicksilver.eval.generation import forced_vs_decoded
from quicksilver.runtime.generate import generate

SKIPDECODE = {"skipdecode": {"max_layers": 5, "min_layers": 2, "decay_length": 4}}
CONFIGS = {
    **MATRIX,
    "skipdecode": SKIPDECODE,
    "skipdecode_halt": {**SKIPDECODE, **MATRIX["halt_skip"]},
}
SAME_PATH = [name for name, config in CONFIGS.items() if "fusion" not in config]


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, fast=True)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_generation_equals_each_row_alone(model, name: str) -> None:
    engine = make_engine(model, CONFIGS[name])
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    together = generate(engine, prompts, 6, ignore_eos=True).tokens
    alone = [generate(engine, [p], 6, ignore_eos=True).tokens[0] for p in prompts]
    assert together == alone


@pytest.mark.parametrize("name", SAME_PATH)
def test_teacher_forced_logits_equal_decoding(model, name: str) -> None:
    engine = make_engine(model, CONFIGS[name])
    tokens = torch.randint(
        0, CONFIG.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3)
    )
    prompt = 4
    cache = engine.new_cache(1, 12)
    cache.set_prompt_end(prompt)
    forced = engine.forward(tokens, cache, logits_at="all")[0, prompt - 1 :]
    cache = engine.new_cache(1, 12)
    cache.set_prompt_end(prompt)
    decoded = [engine.forward(tokens[:, :prompt], cache)[0]]
    decoded += [engine.forward(tokens[:, i : i + 1], cache)[0] for i in range(prompt, 12)]
    torch.testing.assert_close(torch.stack(decoded), forced, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["halt_skip", "skipdecode", "fusion_relative_w3"])
def test_forced_vs_decoded_measures_the_difference(model, name: str) -> None:
    """The measured gap between `eval` and generation is zero where the test above proves
    them identical, and not zero for fusion (whose prompt tokens fold only when forced)."""
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15]]
    continuations = [[20, 21, 22, 23, 24, 25], [26, 27, 28, 29]]
    gap = forced_vs_decoded(make_engine(model, CONFIGS[name]), prompts, continuations)
    if name in SAME_PATH:
        assert gap.max_logit_gap < 1e-4
        assert gap.ppl_forced == pytest.approx(gap.ppl_decoded, rel=1e-5)
    else:
        assert gap.max_logit_gap > 1e-3 and gap.ppl_forced != gap.ppl_decoded
