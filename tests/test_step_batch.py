"""The step core (``runtime.batch.StepBatch``): rows that come and go over one KV cache.

In fp32 a row gets exactly the tokens it gets alone, whenever it is admitted and whoever
shares its steps, under every policy of the shared matrix; cancelled and finished rows free
their cache rows (more rows than the cache holds pass through it over time); seeded rows
reproduce; chunked prefill equals one-shot prefill; n-gram drafts verified by the full model
give the plain decoder's greedy tokens, and speculative sampling draws from plain sampling's
distribution (a deliberately wrong acceptance rule fails the same test).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_accounting import random_model
from test_policies import CONFIG, MATRIX, make_engine

from quicksilver.errors import QuicksilverError
from quicksilver.runtime.batch import StepBatch
from quicksilver.runtime.cache import pad_token_id
from quicksilver.runtime.rows import RowSpec
from quicksilver.runtime.sampling import SamplingConfig, draw_key, probabilities, uniform_at
from quicksilver.runtime.speculative import (
    SpeculativeConfig,
    accept_drafts,
    ngram_draft,
    speculative_config,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, fast=True)


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, CONFIG.vocab_size, (n,), generator=g).tolist() for n in lengths]


def run_all(batch: StepBatch, max_steps: int = 500) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for _ in range(max_steps):
        if not batch.has_work:
            break
        for event in batch.step():
            out.setdefault(event.row, []).extend(event.tokens)
    assert not batch.has_work
    return out


def alone(model, policy, prompt, new, **spec) -> list[int]:
    batch = StepBatch(make_engine(model, policy), max_rows=1, max_len=64)
    row = batch.admit(RowSpec(tuple(prompt), new, **spec))
    return run_all(batch)[row]


@pytest.mark.parametrize("name", [None, *MATRIX])
def test_a_row_admitted_while_others_run_gets_its_tokens_alone(model, name) -> None:
    """Rows join mid-run at staggered steps and leave early; each row's greedy tokens equal
    the tokens it produces alone (fp32), under every policy of the matrix."""
    policy = None if name is None else MATRIX[name]
    texts, budgets = STAGGERED_TEXTS, STAGGERED_BUDGETS
    got = staggered(StepBatch(make_engine(model, policy), max_rows=2, max_len=40, prefill_tokens=8))
    for i, prompt in enumerate(texts):
        assert got[i] == alone(model, policy, prompt, budgets[i]), f"row {i} under {name}"


STAGGERED_TEXTS = prompts(1, [5, 9, 3, 7])
STAGGERED_BUDGETS = [6, 3, 8, 5]


def staggered(batch: StepBatch) -> list[list[int]]:
    """``STAGGERED_TEXTS`` through ``batch``, a new arrival every other step while earlier
    rows run and leave; each row's tokens, in arrival order."""
    texts, budgets = STAGGERED_TEXTS, STAGGERED_BUDGETS
    ids, got = {}, {}
    pending = list(range(len(texts)))
    for step in range(200):
        if pending and step % 2 == 0:
            i = pending.pop(0)
            ids[batch.admit(RowSpec(tuple(texts[i]), budgets[i]))] = i
        if not batch.has_work and not pending:
            break
        for event in batch.step():
            got.setdefault(ids[event.row], []).extend(event.tokens)
    return [got[i] for i in range(len(texts))]


def test_chunked_prefill_equals_one_forward(model) -> None:
    text = prompts(2, [30])[0]
    one = StepBatch(make_engine(model, None), max_rows=1, max_len=40, prefill_tokens=64)
    chunked = StepBatch(make_engine(model, None), max_rows=1, max_len=40, prefill_tokens=7)
    a, b = one.admit(RowSpec(tuple(text), 5)), chunked.admit(RowSpec(tuple(text), 5))
    assert run_all(one)[a] == run_all(chunked)[b]
    # the 30-token prompt went in 5 chunks of at most 7 before the first token came out
    assert chunked.stats.decode_steps == one.stats.decode_steps


def test_cancelled_and_finished_rows_free_their_cache_rows(model) -> None:
    """Ten rows pass through a two-row cache: some cancelled while waiting, prefilling or
    running, the others finishing; every survivor's tokens equal its tokens alone."""
    engine = make_engine(model, None)
    batch = StepBatch(engine, max_rows=2, max_len=40, prefill_tokens=4)
    texts = prompts(3, [6, 4, 8, 5, 7, 3, 9, 4, 6, 5])
    ids = [batch.admit(RowSpec(tuple(t), 4)) for t in texts]
    cancelled = {ids[1], ids[4], ids[7]}
    got: dict[int, list[int]] = {}
    batch.finish(ids[1], "cancelled")  # while waiting
    for step in range(300):
        if step == 3:
            batch.finish(ids[4], "cancelled")
        if step == 5:
            batch.finish(ids[7], "cancelled")
        if not batch.has_work:
            break
        assert batch.active_rows <= 2
        for event in batch.step():
            got.setdefault(event.row, []).extend(event.tokens)
    assert not batch.has_work and batch.active_rows == 0
    for row_id, text in zip(ids, texts, strict=True):
        if row_id not in cancelled:
            assert got[row_id] == alone(model, None, text, 4)
    assert int(batch.cache.lengths.sum()) == 0  # every cache row is empty again


def test_seeded_rows_reproduce_whoever_shares_the_batch(model) -> None:
    sampling = SamplingConfig(temperature=1.0, seed=1234)
    text = prompts(4, [6])[0]
    reference = alone(model, None, text, 8, sampling=sampling)
    batch = StepBatch(make_engine(model, None), max_rows=3, max_len=40)
    others = [
        batch.admit(RowSpec(tuple(t), 8, SamplingConfig(temperature=0.7, seed=s)))
        for s, t in enumerate(prompts(5, [4, 9]))
    ]
    mine = batch.admit(RowSpec(tuple(text), 8, sampling))
    assert run_all(batch)[mine] == reference
    assert others


def test_logprobs_are_the_chosen_tokens_log_softmax(model) -> None:
    engine = make_engine(model, None)
    batch = StepBatch(engine, max_rows=1, max_len=40)
    text = prompts(6, [5])[0]
    row = batch.admit(RowSpec(tuple(text), 3, logprobs=2))
    tokens, logprobs, tops = [], [], []
    while batch.has_work:
        for event in batch.step():
            tokens += event.tokens
            logprobs += event.logprobs
            tops += event.top
    plain = make_engine(model, None)
    sequence = torch.tensor([text + tokens[:-1]])
    logits = plain.forward(sequence, plain.new_cache(1, sequence.shape[1]), logits_at="all")[0]
    expected = torch.log_softmax(logits[len(text) - 1 :].float(), -1)
    for i, token in enumerate(tokens):
        assert logprobs[i] == pytest.approx(float(expected[i, token]), abs=1e-5)
        assert tops[i][0][0] == token  # greedy: the chosen token is the best
        assert len(tops[i]) == 2
    assert row == 0


def test_rows_that_do_not_fit_are_refused(model) -> None:
    batch = StepBatch(make_engine(model, None), max_rows=1, max_len=10)
    with pytest.raises(QuicksilverError, match="positions"):
        batch.admit(RowSpec((3,) * 8, 4))
    with pytest.raises(QuicksilverError, match="no tokens"):
        batch.admit(RowSpec((), 4))


def test_counted_dense_equivalent_equals_counted_for_the_dense_model(model) -> None:
    engine = make_engine(model, None)
    batch = StepBatch(engine, max_rows=2, max_len=40, prefill_tokens=5)
    for text in prompts(7, [6, 11, 4]):
        batch.admit(RowSpec(tuple(text), 4))
    run_all(batch)
    assert engine.counter.dense == engine.counter.total > 0


# ---------------------------------------------------------------- verified decoding


def test_ngram_draft_takes_the_longest_earlier_match() -> None:
    history = [5, 6, 7, 8, 1, 5, 6, 9, 2, 5, 6]
    # "5 6" occurred twice before: the latest occurrence is followed by 9, 2
    assert ngram_draft(history, 2, max_ngram=3) == [9, 2]
    assert ngram_draft([1, 2, 3], 4, max_ngram=3) == []
    assert ngram_draft([4, 4, 4, 4], 3, max_ngram=2) == [4]  # the latest match has one after it


@pytest.mark.parametrize("name", [None, "halt_relative", "halt_skip", "int4", "skipdecode"])
def test_ngram_verified_greedy_equals_plain_greedy(model, name) -> None:
    """Repetitive prompts (so drafts are found and some accepted, some rejected): every row's
    tokens equal plain greedy decoding's, in fp32, alone and in a batch."""
    policy = None if name is None else MATRIX[name]
    base = prompts(8, [4, 3, 5])
    texts = [b * 3 for b in base]
    config = SpeculativeConfig(num_tokens=4)
    engine = make_engine(model, policy)
    batch = StepBatch(engine, max_rows=3, max_len=60)
    ids = [batch.admit(RowSpec(tuple(t), 12, speculative=config)) for t in texts]
    got = run_all(batch)
    for row_id, text in zip(ids, texts, strict=True):
        assert got[row_id] == alone(model, policy, text, 12), name
    assert batch.stats.drafts > 0 and batch.stats.accepted_tokens > 0


def test_speculative_is_refused_where_tokens_interact(model) -> None:
    batch = StepBatch(make_engine(model, MATRIX["fusion_relative_w1"]), max_rows=1, max_len=40)
    batch.admit(RowSpec((5, 6, 5, 6, 5), 6, speculative=SpeculativeConfig(num_tokens=4)))
    with pytest.raises(QuicksilverError, match="fusion"):
        run_all(batch)


def _draws(rule, n: int = 4000) -> torch.Tensor:
    """Counts of the first emitted token over n verified steps of a 5-token vocabulary."""
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.7, 0.0], [0.3, 0.1, 0.9, -1.0, 0.4]])
    sampling = SamplingConfig(temperature=0.9, top_k=4)
    key = draw_key(7)
    counts = torch.zeros(5)
    for trial in range(n):
        uniforms = [uniform_at(key, 2 * trial), uniform_at(key, 2 * trial + 1)]
        accepted, token = rule(logits, [3], sampling, uniforms)
        counts[3 if accepted else token] += 1
    return counts


def test_speculative_sampling_draws_plain_samplings_distribution() -> None:
    """Total-variation distance between the first emitted token's empirical distribution and
    plain sampling's processed distribution stays small; a wrong rule (accept always) fails."""
    sampling = SamplingConfig(temperature=0.9, top_k=4)
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.7, 0.0]])
    expected = probabilities(logits, sampling)[0].float()
    n = 4000
    bound = 3 * math.sqrt(5 / n)  # a few standard errors, summed over 5 cells

    def tv(counts: torch.Tensor) -> float:
        return 0.5 * float((counts / n - expected).abs().sum())

    assert tv(_draws(accept_drafts, n)) < bound

    def accept_always(logits, draft, sampling, uniforms):
        return len(draft), 0

    assert tv(_draws(accept_always, n)) > bound


def test_speculative_values_are_checked() -> None:
    assert speculative_config("ngram") == SpeculativeConfig()
    assert speculative_config({"method": "ngram", "num_tokens": 3}).num_tokens == 3
    for bad in ("magic", {"num_token": 3}, {"num_tokens": 0}, 3):
        with pytest.raises(QuicksilverError):
            speculative_config(bad)
    assert pad_token_id(CONFIG) in (0, *CONFIG.eos_token_ids)
