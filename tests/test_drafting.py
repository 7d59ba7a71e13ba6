"""Model drafters and the drafting plan: ``layers`` (calibrated layer skipping), ``planes``
(the 4-bit plane of Matryoshka width-8 codes) and ``auto`` (per row, whatever pays).

Exactness: greedy output with every method equals plain greedy output token for token in
fp32, over the shared policy matrix on a random model and on the real SmolLM2. Savings are
real: a draft forward runs (and counts) only its layers and adds nothing to the dense
equivalent. ``auto`` drafts nothing where the measured costs say drafting cannot pay. The
plan is measured once, kept on disk under the cache root and measured again when damaged.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_accounting import TINY, random_model
from test_policies import CONFIG, MATRIX, make_engine
from test_step_batch import alone, prompts, run_all

import quicksilver as qs
from quicksilver.accounting import exit_head_flops
from quicksilver.errors import QuicksilverError
from quicksilver.runtime.batch import StepBatch
from quicksilver.runtime.generate import generate
from quicksilver.runtime.rows import RowSpec
from quicksilver.runtime.speculative import (
    MAX_DRAFT_TOKENS,
    DraftPlan,
    DraftPlans,
    SpeculativeConfig,
    calibrate,
    expected_speedup,
)
from quicksilver.runtime.speculative.self_draft import exit_draft, model_drafts, skip_layers

FLAT = [1.0] * (MAX_DRAFT_TOKENS + 1)  # a verify of any length costs one step


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, fast=True)


@pytest.fixture(scope="module")
def plan(model) -> DraftPlan:
    """One measured plan for the random model (measuring is what this exercises; the
    exactness tests below reuse it under every policy)."""
    return calibrate(make_engine(model, None), prompts(3, [12])[0])


def batch_with(model, policy, plan: DraftPlan, **sizes) -> StepBatch:
    """A step batch whose drafting plan is ``plan`` (measured elsewhere)."""
    engine = make_engine(model, policy)
    plans = DraftPlans()
    plans.add(engine, plan)
    return StepBatch(engine, plans=plans, **sizes)


def test_the_measured_plan_is_whole(plan: DraftPlan) -> None:
    assert plan.rows and all(len(curve) == MAX_DRAFT_TOKENS + 1 for curve in plan.verify_cost)
    assert all(cost > 0 for curve in plan.verify_cost for cost in curve)
    assert plan.skipped_layers and len(plan.skipped_layers) < CONFIG.n_layers
    assert 0.0 <= plan.layers_agreement <= 1.0 and plan.layers_cost
    assert plan.candidates and plan.seconds > 0
    assert DraftPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    with pytest.raises(QuicksilverError):
        DraftPlan.from_dict({**plan.to_dict(), "verify_cost": [[1.0]]})


@pytest.mark.parametrize("method", ["layers", "auto"])
@pytest.mark.parametrize("name", [None, "halt_relative", "halt_skip", "int4", "skipdecode"])
def test_model_drafts_verified_greedy_equals_plain_greedy(model, plan, name, method) -> None:
    """Repetitive and plain prompts in one batch: every row's tokens equal plain greedy
    decoding's (fp32), and drafts were made and some accepted."""
    policy = None if name is None else MATRIX[name]
    base = prompts(8, [4, 3, 5])
    texts = [base[0] * 3, base[1], base[2] * 2]
    cheap = dataclasses.replace(plan, verify_cost=[FLAT] * len(plan.rows))  # auto drafts
    batch = batch_with(model, policy, cheap, max_rows=3, max_len=60)
    config = SpeculativeConfig(method=method, num_tokens=3)
    ids = [batch.admit(RowSpec(tuple(t), 12, speculative=config)) for t in texts]
    got = run_all(batch)
    for row_id, text in zip(ids, texts, strict=True):
        assert got[row_id] == alone(model, policy, text, 12), (name, method)
    stats = batch.stats
    assert stats.drafts > 0 and stats.accepted_tokens > 0
    assert sum(d for d, _, _ in stats.by_method.values()) == stats.drafts
    if method == "layers":
        assert set(stats.by_method) == {"layers"} and stats.draft_flops > 0


def test_a_draft_forward_runs_only_its_layers(model) -> None:
    """Skipped layers execute nothing: no FLOPs counted for them, fewer weight bytes read,
    and no dense-equivalent work (plain decoding would not run a draft at all)."""
    engine = make_engine(model, None)
    cache = engine.new_cache(2, 20)
    cache.set_prompt_end(0)
    engine.forward(torch.tensor(prompts(1, [6, 6])), cache)
    shape = skip_layers(CONFIG.n_layers, [1, 3])
    counter = engine.counter
    layers_before, dense_before = list(counter.per_layer), counter.dense
    drafts = model_drafts(engine, cache, [5, 7], 3, shape)
    spent = [after - before for after, before in zip(counter.per_layer, layers_before, strict=True)]
    assert spent[1] == spent[3] == 0 and all(spent[i] > 0 for i in (0, 2, 4))
    assert counter.dense == dense_before
    assert len(drafts) == 2 and all(len(d) == 3 for d in drafts)
    assert cache.lengths.tolist() == [6, 6]  # the drafting round was rolled back
    with pytest.raises(QuicksilverError, match="at least one layer"):
        skip_layers(3, [0, 1, 2])


def test_auto_drafts_nothing_where_drafting_cannot_pay(model, plan) -> None:
    """With verification as dear as decoding each token alone and model drafts as dear as
    the model, no draft can beat plain decoding: auto drafts nothing and the output is plain."""
    dear = dataclasses.replace(
        plan,
        verify_cost=[[float(k + 1) for k in range(MAX_DRAFT_TOKENS + 1)]] * len(plan.rows),
        layers_cost=[1.0] * len(plan.rows),
    )
    batch = batch_with(model, None, dear, max_rows=1, max_len=60)
    text = prompts(8, [4])[0] * 4
    row = batch.admit(RowSpec(tuple(text), 10, speculative=SpeculativeConfig(method="auto")))
    assert run_all(batch)[row] == alone(model, None, text, 10)
    assert batch.stats.drafts == 0 and batch.stats.decode_steps == 9


def test_a_batch_shares_one_draft_width(model, plan) -> None:
    """auto's n-gram drafts in one step are cut to the width that pays for the whole batch:
    the full matches when verifying is free, nothing when each drafted slot costs a step."""
    from quicksilver.runtime.speculative.chooser import Choice, Drafter

    def shared(verify_cost) -> list[int]:
        drafter = Drafter(make_engine(model, None), DraftPlans(), None)
        drafter._plan = dataclasses.replace(plan, verify_cost=[verify_cost] * len(plan.rows))
        choices = [
            Choice("ngram", 2, [1, 2], match=[1, 2, 3, 4], rate=0.9),
            Choice(None, 0, [], match=[5, 6], rate=0.3),
            Choice(),
        ]
        drafter._share_width(choices, 3)
        return [c.length for c in choices]

    assert shared(FLAT) == [4, 2, 0]
    assert shared([float(k + 1) * 3 for k in range(MAX_DRAFT_TOKENS + 1)]) == [0, 0, 0]


def test_expected_speedup_and_best_length() -> None:
    assert expected_speedup(0.0, 0.0, 1.0, 3) == 1.0  # nothing accepted, verify free
    assert expected_speedup(1.0, 0.0, 1.0, 4) == 5.0  # all accepted: five tokens a step
    plan = DraftPlan(rows=[1], verify_cost=[FLAT])
    assert plan.best_length(0.9, 0.0, 1, 8) == (8, sum(0.9**i for i in range(9)))
    assert plan.best_length(0.3, 1.0, 1, 8)[0] == 0  # a full-cost draft never pays


PLANES = {"matryoshka": {"fixed_bits": 8, "kernel": "planes"}}
WIDE = dataclasses.replace(TINY, hidden_size=64, n_heads=4, intermediate_size=128)


def test_planes_drafts_with_the_four_bit_plane_and_verifies_at_eight() -> None:
    model = random_model(WIDE, fast=True)
    plan = DraftPlan(
        rows=[1], verify_cost=[FLAT], planes_agreement=0.9, planes_cost=[0.5], layers_cost=[]
    )
    text = prompts(5, [6])[0]
    text = [t % WIDE.vocab_size for t in text]
    batch = batch_with(model, PLANES, plan, max_rows=1, max_len=40)
    config = SpeculativeConfig(method="planes", num_tokens=3)
    row = batch.admit(RowSpec(tuple(text), 10, speculative=config))
    got = run_all(batch)[row]
    plain = StepBatch(make_engine(model, PLANES), max_rows=1, max_len=40)
    plain_row = plain.admit(RowSpec(tuple(text), 10))
    assert got == run_all(plain)[plain_row]
    assert batch.stats.by_method["planes"][0] > 0
    assert batch.stats.draft_flops > 0
    # Without Matryoshka width-8 weights there is no plane to draft with: one line says so.
    dense = batch_with(model, None, plan, max_rows=1, max_len=40)
    dense.admit(RowSpec(tuple(text), 4, speculative=config))
    with pytest.raises(QuicksilverError, match="fixed_bits': 8"):
        run_all(dense)


def test_the_plan_is_kept_on_disk_and_remeasured_when_damaged(
    tmp_path, monkeypatch, tiny_llm_dir
) -> None:
    monkeypatch.setenv("QUICKSILVER_CACHE", str(tmp_path))
    llm = qs.load(str(tiny_llm_dir), dtype="float32")
    first = llm.draft_plan()
    files = list((tmp_path / "drafting").glob("*.json"))
    assert len(files) == 1 and first.seconds > 0
    again = qs.load(str(tiny_llm_dir), dtype="float32").draft_plan()
    assert again == first  # read back, not measured again
    files[0].write_text("{not json")
    third = qs.load(str(tiny_llm_dir), dtype="float32")
    assert third.draft_plan().seconds > 0
    assert json.loads(files[0].read_text())["plan"]["version"] == first.version
    out = third.generate("abc abc abc abc", max_new_tokens=6, speculative="auto")
    plain = third.generate("abc abc abc abc", max_new_tokens=6)
    assert out.completions[0].token_ids == plain.completions[0].token_ids
    record = out.speculative
    assert record["method"] == "auto" and record["calibration_seconds"] == 0.0
    assert {"draft_flops", "verify_flops", "by_method", "draft_seconds"} <= set(record)


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory):
    from tiny_models import byte_level_tokenizer, save_tiny, tiny_llama

    directory = save_tiny(tiny_llama(), tmp_path_factory.mktemp("drafting") / "tiny")
    byte_level_tokenizer().save_pretrained(str(directory))
    return directory


def test_real_model_greedy_is_unchanged_by_every_drafter(smollm_fp32) -> None:
    """SmolLM2-135M, fp32: ngram, layers and auto give plain greedy decoding's tokens (a plan
    with a fixed skipped set stands in for the measured one, which takes a minute here)."""
    llm = qs.LLM(smollm_fp32)
    engine = llm.engine
    plan = DraftPlan(
        rows=[1],
        verify_cost=[FLAT],
        skipped_layers=[13, 14, 18],
        layers_agreement=0.9,
        layers_cost=[0.9],
    )
    llm.draft_plans.add(engine, plan)
    prompt = (
        "The museum opened a new wing. The new wing holds paintings from the north. "
        "Visitors said the new wing"
    )
    plain = llm.generate(prompt, max_new_tokens=24).completions[0].token_ids
    for method in ("ngram", "layers", "auto"):
        out = llm.generate(prompt, max_new_tokens=24, speculative=method)
        assert out.completions[0].token_ids == plain, method
        assert out.speculative["drafts"] > 0, method


UNRUNNABLE = [
    (None, "planes", "'planes'"),
    ({"matryoshka": {"fixed_bits": 4}}, "planes", "'planes'"),
    ({"fusion": {"threshold": 0.5, "start_layer": 0}}, "ngram", "fusion"),
    ({"fusion": {"threshold": 0.5, "start_layer": 0}}, "layers", "fusion"),
]


@pytest.mark.parametrize(("policy", "method", "reason"), UNRUNNABLE)
def test_drafting_that_cannot_run_is_refused_when_asked(
    tiny_llm_dir, policy, method: str, reason: str
) -> None:
    """An InvalidArgument from the call itself (stream, submit), before any step: not an
    error at the first decode step, after the first token was streamed."""
    llm = qs.load(str(tiny_llm_dir), dtype="float32")
    with pytest.raises(qs.InvalidArgument, match=reason):
        llm.generate("Hello", max_new_tokens=4, policy=policy, speculative=method)
    with pytest.raises(qs.InvalidArgument, match=reason):
        llm.stream("Hello", max_new_tokens=4, policy=policy, speculative=method)  # not iterated
    batch = llm.open_batch(max_rows=2, max_len=64, policy=policy)
    with pytest.raises(qs.InvalidArgument, match=reason):
        batch.submit("Hello", max_new_tokens=4, speculative=method)
    assert not batch.has_work
    engine = llm.engine
    engine.set_policy(None if policy is None else qs.load_policy(policy))
    steps = engine.counter.total
    with pytest.raises(QuicksilverError, match=reason):
        generate(engine, [[5, 6, 7]], 4, speculative=SpeculativeConfig(method=method))
    assert engine.counter.total == steps  # refused before any forward


@pytest.fixture(scope="module")
def exiting():
    """The random model with random exit heads (a fitted adapter's stand-in)."""
    from quicksilver.adapt.exits import ExitHeads

    model = random_model(CONFIG, fast=True)
    heads = ExitHeads(CONFIG.n_layers, CONFIG.hidden_size)
    torch.manual_seed(3)
    with torch.no_grad():
        heads.weight.add_(torch.randn_like(heads.weight) * 0.2)
        heads.bias.normal_(0, 0.1)
    model.exit_heads = heads.requires_grad_(False)
    return model


def test_an_early_exit_draft_reads_its_last_layer_through_the_exit_head(exiting) -> None:
    engine = make_engine(exiting, None)
    tokens = torch.tensor(prompts(1, [7]))
    shape = exit_draft(CONFIG.n_layers, 2)
    states = []
    cache = engine.new_cache(1, 7)
    checks = engine.counter.checks
    logits = engine.forward(
        tokens, cache, logits_at="all", draft=shape, observe=lambda i, h: states.append(i)
    )
    assert states == [0, 1, 2]  # layers 3 and 4 never ran
    assert engine.counter.checks - checks == exit_head_flops(CONFIG, 7)
    cache = engine.new_cache(1, 7)
    plain = engine.forward(
        tokens, cache, logits_at="all", draft=skip_layers(CONFIG.n_layers, [3, 4])
    )
    heads, exiting.exit_heads = exiting.exit_heads, None
    try:
        cache = engine.new_cache(1, 7)
        unmapped = engine.forward(tokens, cache, logits_at="all", draft=shape)
    finally:
        exiting.exit_heads = heads
    torch.testing.assert_close(unmapped, plain)  # without heads: the same layers, read as is
    assert not torch.allclose(logits, plain)
    with pytest.raises(QuicksilverError, match="before the last layer"):
        exit_draft(CONFIG.n_layers, CONFIG.n_layers - 1)


def test_a_model_with_exit_heads_measures_early_exits_and_drafts_through_them(exiting) -> None:
    plan = calibrate(make_engine(exiting, None), prompts(3, [12])[0])
    exits = [c for c in plan.candidates if "exit_layer" in c]
    assert exits and all(c["skipped"] == list(range(c["exit_layer"] + 1, 5)) for c in exits)
    assert len(exits) < len(plan.candidates)  # the layer-skipping sets were measured too
    assert DraftPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    early = dataclasses.replace(
        plan, exit_layer=2, skipped_layers=[3, 4], verify_cost=[FLAT] * len(plan.rows)
    )
    batch = batch_with(exiting, None, early, max_rows=2, max_len=60)
    texts = [prompts(8, [4])[0] * 3, prompts(9, [5])[0]]
    config = SpeculativeConfig(method="layers", num_tokens=3)
    ids = [batch.admit(RowSpec(tuple(t), 12, speculative=config)) for t in texts]
    got = run_all(batch)
    for row_id, text in zip(ids, texts, strict=True):
        assert got[row_id] == alone(exiting, None, text, 12)
    assert batch.stats.drafts > 0
    assert batch.drafter.shape("layers").exit_layer == 2
