"""Tests for sliding-window perplexity: the window plan, parity with transformers, batching,
FLOP accounting and input validation."""

from __future__ import annotations

import json
import math

import pytest
from tiny_models import save_tiny, tiny_llama

import quicksilver as qs
from quicksilver.accounting import head_flops_per_token
from quicksilver.errors import QuicksilverError
from quicksilver.eval.datasets import EvalText, default_data_dir, load_eval_text
from quicksilver.eval.perplexity import (
    PerplexityResult,
    evaluate_perplexity,
    evaluate_rolling_perplexity,
    transformers_perplexity,
    window_plan,
)
from quicksilver.runtime.engine import Engine
from quicksilver.scoring import rolling_loglikelihood
from quicksilver.text import encode_stream

WIKI_TEST = default_data_dir() / "wikitext-2-raw" / "wiki.test.raw"
needs_wikitext = pytest.mark.skipif(
    not WIKI_TEST.is_file(), reason=f"{WIKI_TEST} not found (set QUICKSILVER_DATA_DIR)"
)
CONTEXT, STRIDE = 256, 128


def _guide_plan(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The Hugging Face guide's loop written out literally (first label dropped by the shift)."""
    plan, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        trg_len = end - prev_end
        plan.append((begin, end, min(trg_len, end - begin - 1)))
        prev_end = end
        if end == n:
            break
    return plan


@pytest.mark.parametrize(
    ("n", "context", "stride"),
    [
        (2, 2, 1),
        (10, 4, 1),
        (10, 4, 2),
        (10, 4, 3),
        (10, 4, 4),
        (11, 4, 4),
        (1000, 256, 128),
        (1000, 256, 256),
        (1001, 256, 100),
        (5, 8, 4),
        (5, 8, 8),
        (3, 2, 2),
        (9, 3, 3),
    ],
)
def test_window_plan_scores_every_token_once(n: int, context: int, stride: int) -> None:
    plan = window_plan(n, context, stride)
    scored: list[int] = []
    for begin, end, n_scored in plan:
        assert 0 <= begin < end <= n and end - begin <= context
        assert 1 <= n_scored <= end - begin - 1  # every scored token has history in its window
        scored.extend(range(end - n_scored, end))
    assert scored == list(range(1, n))
    assert plan[-1][1] == n


@pytest.mark.parametrize(
    ("n", "context", "stride"), [(1000, 256, 128), (1001, 256, 100), (10, 4, 1), (5, 8, 4)]
)
def test_window_plan_is_the_guide_plan_when_windows_overlap(
    n: int, context: int, stride: int
) -> None:
    assert window_plan(n, context, stride) == _guide_plan(n, context, stride)


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wiki_slice() -> EvalText:
    if not WIKI_TEST.is_file():
        pytest.skip(f"{WIKI_TEST} not found (set QUICKSILVER_DATA_DIR)")
    return load_eval_text("wikitext-2", "test", max_chars=2500)  # 663 tokens: 5 windows of <= 256


@pytest.fixture(scope="module")
def wiki_ids(smollm_fp32, wiki_slice: EvalText) -> list[int]:
    return encode_stream(smollm_fp32.tokenizer, wiki_slice.text)


@pytest.fixture(scope="module")
def engine(smollm_fp32) -> Engine:
    return Engine(smollm_fp32.model)


@pytest.fixture(scope="module")
def result(engine: Engine, wiki_ids: list[int], wiki_slice: EvalText) -> PerplexityResult:
    return evaluate_perplexity(engine, wiki_ids, context=CONTEXT, stride=STRIDE, text=wiki_slice)


def test_stream_encoding_adds_no_special_tokens(smollm_fp32, wiki_slice: EvalText) -> None:
    tokenizer = smollm_fp32.tokenizer
    ids = encode_stream(tokenizer, wiki_slice.text)
    assert ids == tokenizer(wiki_slice.text, add_special_tokens=False)["input_ids"]
    assert (
        encode_stream(tokenizer, "Hello")
        == tokenizer("Hello", add_special_tokens=False)["input_ids"]
    )
    assert tokenizer.bos_token_id not in ids


@needs_wikitext
def test_matches_transformers(result: PerplexityResult, hf_smollm_fp32, wiki_ids) -> None:
    ref_ppl, ref_tokens = transformers_perplexity(
        hf_smollm_fp32, wiki_ids, context=CONTEXT, stride=STRIDE
    )
    assert result.tokens == ref_tokens == len(wiki_ids) - 1
    assert result.windows == len(window_plan(len(wiki_ids), CONTEXT, STRIDE))
    assert result.ppl == pytest.approx(ref_ppl, rel=1e-3)
    assert 5 < result.ppl < 200  # a sane language model on English text


@needs_wikitext
def test_batched_windows_give_the_same_result(engine: Engine, wiki_ids: list[int]) -> None:
    # Short windows keep this cheap. The plan is the first window, 2 full ones and a shorter
    # last one, so batch 2 runs groups of 1, 2 and 1 windows.
    ids = wiki_ids[:150]
    single = evaluate_perplexity(engine, ids, context=64, stride=32)
    batched = evaluate_perplexity(engine, ids, context=64, stride=32, batch_size=2)
    assert single.windows == batched.windows == 4
    assert batched.tokens == single.tokens == len(ids) - 1
    assert batched.ppl == pytest.approx(single.ppl, rel=1e-5)
    # The same windows ran, only grouped differently: the same FLOPs. (Weight bytes differ:
    # a batched forward reads each layer's weights once for all its windows.)
    work = {k: v for k, v in single.flops.items() if not k.startswith("weight_bytes")}
    assert {k: batched.flops[k] for k in work} == work
    assert batched.flops["weight_bytes_full"] < single.flops["weight_bytes_full"]


@needs_wikitext
def test_counted_flops_equal_dense_flops(result: PerplexityResult, smollm_fp32) -> None:
    config = smollm_fp32.model.config
    assert result.flops_per_token == result.dense_flops_per_token
    # The LM head ran only where a scored token is predicted.
    assert result.flops["head_tokens"] == result.tokens
    assert result.flops["head"] == result.tokens * 2 * config.embed_dim * config.vocab_size
    assert result.flops["head"] == result.tokens * head_flops_per_token(config)


@needs_wikitext
def test_byte_and_word_metrics(result: PerplexityResult, wiki_slice: EvalText) -> None:
    assert result.n_bytes == wiki_slice.n_bytes and result.n_words == wiki_slice.n_words
    assert result.bits_per_byte == pytest.approx(result.nll_sum / wiki_slice.n_bytes / math.log(2))
    assert result.byte_ppl == pytest.approx(2**result.bits_per_byte)
    assert result.word_ppl == pytest.approx(math.exp(result.nll_sum / wiki_slice.n_words))
    assert result.ppl == pytest.approx(math.exp(result.nll_sum / result.tokens))
    assert result.seconds > 0 and result.peak_rss_bytes > 0
    json.dumps(result.to_dict(), allow_nan=False)


@needs_wikitext
def test_without_text_or_with_max_windows_bytes_are_unknown(
    engine: Engine, wiki_ids: list[int], wiki_slice: EvalText, result: PerplexityResult
) -> None:
    partial = evaluate_perplexity(
        engine, wiki_ids[:200], context=64, stride=32, text=wiki_slice, max_windows=2
    )
    assert partial.windows == 2 and partial.tokens == 63 + 32
    assert math.isnan(partial.bits_per_byte) and partial.n_bytes == 0 and partial.n_words == 0
    assert partial.to_dict()["word_ppl"] is None  # the JSON form: NaN is null
    json.dumps(partial.to_dict(), allow_nan=False)


@pytest.mark.parametrize(
    ("kwargs", "n_tokens", "message"),
    [
        ({"context": 1, "stride": 1}, 50, "context must be at least 2"),
        ({"context": 16, "stride": 0}, 50, "stride must be between 1"),
        ({"context": 16, "stride": 17}, 50, "stride must be between 1"),
        ({"context": 8193, "stride": 512}, 50, "exceeds the model's 8192 positions"),
        ({"context": 16, "stride": 8}, 0, "at least 2"),
        ({"context": 16, "stride": 8}, 1, "at least 2"),
        ({"context": 16, "stride": 8, "batch_size": 0}, 50, "batch_size"),
        ({"context": 16, "stride": 8, "max_windows": 0}, 50, "max_windows"),
    ],
)
def test_bad_input_raises(engine: Engine, kwargs: dict, n_tokens: int, message: str) -> None:
    with pytest.raises(QuicksilverError, match=message):
        evaluate_perplexity(engine, list(range(n_tokens)), **kwargs)
    assert engine.config.max_position_embeddings == 8192


# ---------------------------------------------------------------- document-level rolling windows


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory):
    directory = save_tiny(tiny_llama(), tmp_path_factory.mktemp("rolling") / "tiny", True)
    return qs.load(str(directory), dtype="float32")


def test_rolling_perplexity_sums_the_documents_rolling_scores(tiny_llm) -> None:
    """Each document scored on its own in the harness's windows, whatever the batching; words
    and bytes counted per document (an empty one adds a word and no tokens); the counter sees
    exactly the dense cost of the forwards that ran."""
    texts = [" = A = \n Some words here . \n", "", "x", " Another , longer document " * 3]
    ids = [encode_stream(tiny_llm.tokenizer, t) for t in texts]
    bos = tiny_llm.tokenizer.bos_token_id
    engine = tiny_llm.engine
    expected = -math.fsum(
        rolling_loglikelihood(engine, d, prefix_token=bos, max_length=7) for d in ids if d
    )
    results = [
        evaluate_rolling_perplexity(
            engine, ids, prefix_token=bos, max_length=7, texts=texts, batch_size=batch
        )
        for batch in (1, 4)
    ]
    for result in results:
        assert result.nll_sum == pytest.approx(expected, rel=1e-6)
        assert result.tokens == sum(map(len, ids))
        assert result.windows == sum(-(-len(d) // 7) for d in ids)
        assert result.n_words == 9 + 1 + 1 + 14  # re.split counts an edge space as a word
        assert result.n_bytes == sum(len(t.encode()) for t in texts)
        assert result.word_ppl == pytest.approx(math.exp(expected / result.n_words))
        assert result.bits_per_byte == pytest.approx(expected / result.n_bytes / math.log(2))
        assert result.flops_per_token == pytest.approx(result.dense_flops_per_token, rel=1e-12)
    with pytest.raises(QuicksilverError, match="positions"):
        evaluate_rolling_perplexity(engine, ids, prefix_token=bos, max_length=10**6)
    with pytest.raises(QuicksilverError, match="no tokens"):
        evaluate_rolling_perplexity(engine, [[]], prefix_token=bos, max_length=7)
