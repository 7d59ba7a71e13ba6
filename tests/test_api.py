"""The public API (``import quicksilver as qs``): generation, streaming, stop strings,
perplexity, log-likelihoods, policy scoping, tokenisation of every entry point, argument
errors. The real SmolLM2 checks that the API is the engine's numbers; tiny random models keep
the rest fast."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_text import BOS, bos_tokenizer, byte_ids
from tiny_models import save_tiny, tiny_llama

import quicksilver as qs
from quicksilver.eval.perplexity import evaluate_perplexity
from quicksilver.runtime.engine import Engine
from quicksilver.runtime.generate import generate
from quicksilver.text import encode_stream

PROMPT = "The capital of France is"
TEXT = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the "
    "tallest structure in Paris. Its base is square, measuring 125 metres on each side. During "
    "its construction, the Eiffel Tower surpassed the Washington Monument to become the tallest "
    "man-made structure in the world, a title it held for 41 years."
)
MATRYOSHKA = {"matryoshka": {"fixed_bits": 8}}
HALTING = {"halting": {"relative_drift": 0.1, "min_layer": 1}}


@pytest.fixture(scope="module")
def llm(smollm_fp32) -> qs.LLM:
    """SmolLM2-135M in fp32, sharing the session's loaded weights."""
    return qs.LLM(smollm_fp32)


@pytest.fixture(scope="module")
def greedy(llm: qs.LLM) -> qs.GenerationOutput:
    """PROMPT's greedy continuation, the reference several tests compare with."""
    return llm.generate(PROMPT, max_new_tokens=10)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer random Llama whose tokenizer adds a BOS, as Llama-2's does."""
    directory = save_tiny(tiny_llama(), tmp_path_factory.mktemp("tiny") / "bos")
    bos_tokenizer().save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> qs.LLM:
    return qs.load(str(tiny_dir), dtype="float32")


def _narrow_products(llm: qs.LLM) -> int:
    """How many Linear modules carry Matryoshka's quantised products."""
    return sum(1 for linear in llm.model.linears() if linear.narrow)


def _teacher_forced_logprob(llm: qs.LLM, ids: list[int], n_scored: int) -> float:
    """log P(last n_scored ids | the ones before), from one plain forward through the engine."""
    engine = Engine(llm.model)
    tokens = torch.tensor([ids[:-1]])
    logits = engine.forward(tokens, engine.new_cache(1, len(ids) - 1), logits_at="all")[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(ids[1:])
    return float(logprobs.gather(1, targets[:, None])[-n_scored:].sum())


# ---------------------------------------------------------------- the real model


def test_generate_single_batch_and_token_ids(llm: qs.LLM, greedy: qs.GenerationOutput) -> None:
    ids = llm.encode(PROMPT)
    reference = generate(Engine(llm.model), [ids], 10)
    (completion,) = greedy.completions
    assert completion.token_ids == reference.tokens[0]
    assert completion.prompt_token_ids == ids
    assert completion.finish_reason == "length"
    assert greedy.text == completion.text == llm.decode(reference.tokens[0])
    assert greedy.text.startswith(" Paris")

    batch = llm.generate([PROMPT, "Once upon a time"], max_new_tokens=10)
    assert batch.completions[0].token_ids == completion.token_ids and len(batch.completions) == 2
    by_ids = llm.generate([ids, ids[:3]], max_new_tokens=10).completions[0]
    assert by_ids.token_ids == completion.token_ids

    rows, longest = 2, max(len(c.prompt_token_ids) for c in batch.completions)
    assert batch.flops_per_token == batch.flops["total"] / (rows * (longest + batch.decode_steps))
    record = batch.to_dict()
    json.dumps(record, allow_nan=False)
    assert record["completions"][0]["text"] == greedy.text
    assert record["new_tokens"] == 20 and record["policy"] == {}


def test_stream_pieces_join_to_the_generated_text(llm: qs.LLM, greedy: qs.GenerationOutput) -> None:
    stream = llm.stream(PROMPT, max_new_tokens=10)
    with pytest.raises(qs.QuicksilverError, match="not ended"):
        stream.output  # noqa: B018
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == stream.output.text == greedy.text


def test_stop_strings_cut_the_text_and_end_the_row(
    llm: qs.LLM, greedy: qs.GenerationOutput
) -> None:
    stop = greedy.text[6:9]
    expected = greedy.text[: greedy.text.index(stop)]
    out = llm.generate(PROMPT, max_new_tokens=10, stop=["never appears", stop])
    assert out.text == expected and out.completions[0].finish_reason == "stop"
    assert len(out.completions[0].token_ids) < 10
    stream = llm.stream(PROMPT, max_new_tokens=10, stop=stop)
    assert "".join(stream) == expected == stream.output.text
    unmatched = llm.generate(PROMPT, max_new_tokens=10, stop="never appears")
    assert unmatched.text == greedy.text and unmatched.completions[0].finish_reason == "length"


def test_perplexity_is_evaluate_perplexity_on_the_same_ids(llm: qs.LLM) -> None:
    ids = encode_stream(llm.tokenizer, TEXT)
    expected = evaluate_perplexity(Engine(llm.model), ids, context=32, stride=16)
    from_text = llm.perplexity(TEXT, context=32, stride=16)
    from_ids = llm.perplexity(ids, context=32, stride=16)
    assert from_text.ppl == from_ids.ppl == expected.ppl
    assert from_text.tokens == len(ids) - 1 and from_text.windows == expected.windows
    assert from_text.n_bytes == len(TEXT.encode()) and math.isfinite(from_text.bits_per_byte)
    assert from_ids.to_dict()["bits_per_byte"] is None  # unknown without the text


def test_loglikelihood_is_the_teacher_forced_sum(llm: qs.LLM) -> None:
    context, continuation = PROMPT, " Paris, the city of light"
    result = llm.loglikelihood(context, continuation)
    whole = llm.encode(context + continuation)
    n = len(whole) - len(llm.encode(context))
    assert result.tokens == n
    assert result.logprob == pytest.approx(_teacher_forced_logprob(llm, whole, n), rel=1e-5)
    # An empty context stands as the BOS token, as in lm-evaluation-harness.
    empty = llm.loglikelihood("", "Paris")
    expected = _teacher_forced_logprob(llm, [llm.tokenizer.bos_token_id, *llm.encode("Paris")], 1)
    assert empty.logprob == pytest.approx(expected, rel=1e-5)
    json.dumps(result.to_dict(), allow_nan=False)


def test_is_greedy_matches_greedy_generation(llm: qs.LLM) -> None:
    generated = llm.generate(PROMPT, max_new_tokens=2).completions[0]
    context_ids = llm.encode(PROMPT)
    assert llm.encode(PROMPT + generated.text)[len(context_ids) :] == generated.token_ids
    assert llm.loglikelihood(PROMPT, generated.text).is_greedy
    assert not llm.loglikelihood(PROMPT, " London").is_greedy


def test_batched_loglikelihoods_equal_single_ones(llm: qs.LLM) -> None:
    pairs = [(PROMPT, " Paris"), ("Two plus two is ", "four"), ("", "Hello"), (PROMPT, " a city")]
    batched = llm.loglikelihoods(pairs, batch_size=3)
    for pair, result in zip(pairs, batched, strict=True):
        single = llm.loglikelihood(*pair)
        assert result.tokens == single.tokens and result.is_greedy == single.is_greedy
        assert result.logprob == pytest.approx(single.logprob, rel=1e-4, abs=1e-4)
    assert llm.loglikelihoods([]) == []


# ---------------------------------------------------------------- policies


def test_load_gives_a_ready_model(tiny: qs.LLM, tiny_dir: Path) -> None:
    assert tiny.name == str(tiny_dir) and tiny.dtype == "float32"
    assert tiny.source.kind == "hf_dir" and tiny.load_seconds > 0
    assert tiny.config is tiny.model.config and tiny.engine.policy is None
    assert repr(tiny) == f"LLM({str(tiny_dir)!r}, dtype='float32')"


def test_use_applies_the_policy_inside_and_releases_it(tiny: qs.LLM) -> None:
    with tiny.use(MATRYOSHKA) as policy:
        assert tiny.engine.policy is policy and not policy.is_off
        assert _narrow_products(tiny) > 0
        assert tiny.generate([5, 6, 7], max_new_tokens=2).policy == policy.to_config()
    assert tiny.engine.policy is None and _narrow_products(tiny) == 0
    assert tiny.generate([5, 6, 7], max_new_tokens=2).policy == {}


def test_use_restores_after_an_exception(tiny: qs.LLM) -> None:
    with pytest.raises(RuntimeError, match="inside"), tiny.use(MATRYOSHKA):
        raise RuntimeError("inside")
    assert tiny.engine.policy is None and _narrow_products(tiny) == 0


def test_nested_use_restores_the_outer_policy(tiny: qs.LLM) -> None:
    with tiny.use(MATRYOSHKA) as outer:
        with tiny.use(HALTING) as inner:
            assert tiny.engine.policy is inner and _narrow_products(tiny) == 0
        assert tiny.engine.policy is outer and _narrow_products(tiny) > 0  # prepared again
        with tiny.use(None):
            assert tiny.engine.policy.is_off
        assert tiny.engine.policy is outer
    with tiny.use("dense"), tiny.use(HALTING):
        pass
    assert tiny.engine.policy is None and _narrow_products(tiny) == 0


def test_policy_for_one_call(tiny: qs.LLM) -> None:
    out = tiny.generate([5, 6, 7], max_new_tokens=2, policy=MATRYOSHKA)
    assert out.policy == qs.Policy.from_config(MATRYOSHKA).to_config()
    assert tiny.perplexity(list(range(3, 40)), context=16, stride=8, policy=HALTING).ppl > 0
    assert tiny.loglikelihood("ab", "c", policy=MATRYOSHKA).tokens == 1
    assert tiny.engine.policy is None and _narrow_products(tiny) == 0


def test_a_stream_left_early_restores_the_policy(tiny: qs.LLM) -> None:
    with tiny.stream("ab", max_new_tokens=50, policy=MATRYOSHKA) as stream:
        next(iter(stream), None)
        assert tiny.engine.policy is not None
    assert tiny.engine.policy is None and _narrow_products(tiny) == 0


# ---------------------------------------------------------------- tokenisation


def test_prompt_entry_points_see_the_bos_and_perplexity_does_not(
    tiny: qs.LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_tokens: list[int] = []
    forward = tiny.engine.forward

    def spy(tokens: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        first_tokens.append(int(tokens[0, 0]))
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(tiny.engine, "forward", spy)
    prompt_ids = [BOS, *byte_ids("hello")]
    for call in (
        lambda: tiny.generate("hello", max_new_tokens=1),
        lambda: list(tiny.stream("hello", max_new_tokens=1)),
        lambda: tiny.loglikelihood("hello", " world"),
    ):
        first_tokens.clear()
        call()
        assert first_tokens[0] == BOS
    assert tiny.generate("hello", max_new_tokens=1).completions[0].prompt_token_ids == prompt_ids
    first_tokens.clear()
    result = tiny.perplexity("hello world", context=8, stride=4)
    assert first_tokens[0] == byte_ids("h")[0] and BOS not in first_tokens
    assert result.tokens == len("hello world") - 1


def test_chat_prompts_use_the_template(tiny: qs.LLM) -> None:
    out = tiny.generate("hi", max_new_tokens=1, chat=True)
    assert out.completions[0].prompt_token_ids == [BOS, *byte_ids("user: hi\nbot:")]


# ---------------------------------------------------------------- errors


@pytest.fixture
def poisoned(tiny_dir: Path) -> qs.LLM:
    llm = qs.load(str(tiny_dir), dtype="float32")
    llm.model.final_norm.weight.data.fill_(math.nan)
    return llm


def test_nan_logits_are_an_error(poisoned: qs.LLM) -> None:
    with pytest.raises(qs.QuicksilverError, match="NaN"):
        poisoned.perplexity("hello world", context=8, stride=4)
    with pytest.raises(qs.QuicksilverError, match="NaN"):
        poisoned.loglikelihood("hello", " world")


def test_ignored_sampling_options_warn(tiny: qs.LLM) -> None:
    with pytest.warns(UserWarning, match="top_p"):
        tiny.generate("hi", max_new_tokens=1, top_p=0.5)


BAD_CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any], str]] = [
    # (method, positional arguments, keyword arguments, what the message says)
    ("generate", ([],), {}, "no prompts"),
    ("generate", ("",), {}, "empty"),
    ("generate", (["ok", ""],), {}, "prompt 1 is empty"),
    ("generate", ([[]],), {}, "no tokens"),
    ("generate", ([-1],), {}, "outside the model's vocabulary"),
    ("generate", ([[5], [272]],), {}, "token id 272, outside"),
    ("generate", ([True, 5],), {}, "integer token ids"),
    ("generate", ([1.5],), {}, "integer token ids"),
    ("generate", (5,), {}, "prompts must be"),
    ("generate", (b"hi",), {}, "prompts must be"),
    ("generate", ("hi",), {"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ("generate", ("hi",), {"max_new_tokens": True}, "max_new_tokens must be an integer"),
    ("generate", ("hi",), {"max_new_tokens": 0}, "at least 1"),
    ("generate", ("hi",), {"max_new_tokens": 500}, "positions"),
    ("generate", ("hi",), {"temperature": -1.0}, "temperature"),
    ("generate", ("hi",), {"top_p": 0.0}, "top_p"),
    ("generate", ("hi",), {"stop": 5}, "stop must be"),
    ("generate", ("hi",), {"stop": ["x", 5]}, "stop must be"),
    ("generate", ("hi",), {"stop": [""]}, "must not be empty"),
    ("generate", ("hi",), {"stop_ids": [999]}, "stop_ids"),
    ("generate", ("hi",), {"chat": "yes"}, "chat must be"),
    ("generate", ("hi",), {"policy": 5}, "a policy is"),
    ("generate", ("hi",), {"policy": {"bogus": {}}}, "unknown policy"),
    ("generate", ("hi",), {"policy": {"halting": {"relative_drift": 0.1, "min_layer": 99}}}, "99"),
    ("generate", ("hi",), {"policy": "no-such-file.yaml"}, "no-such-file"),
    ("stream", (["a", "b"],), {}, "one prompt"),
    ("perplexity", ("",), {}, "empty"),
    ("perplexity", ("a",), {"context": 8, "stride": 4}, "at least 2"),
    ("perplexity", ([5, 999],), {}, "outside"),
    ("perplexity", ("hello",), {"context": 1}, "context must be at least 2"),
    ("perplexity", ("hello",), {"context": 2.5}, "context must be an integer"),
    ("perplexity", ("hello",), {"stride": 0}, "stride"),
    ("perplexity", ("hello",), {"context": 4, "stride": 5}, "stride"),
    ("perplexity", ("hello",), {"context": 4096}, "positions"),
    ("perplexity", ("hello",), {"batch_size": True}, "batch_size"),
    ("perplexity", ("hello",), {"context": 4, "stride": 2, "max_windows": 0}, "max_windows"),
    ("loglikelihood", ("a", ""), {}, "continuation is empty"),
    ("loglikelihood", (5, "b"), {}, "pair of strings"),
    ("loglikelihoods", ("ab",), {}, "list of"),
    ("loglikelihoods", ([("a", "b")],), {"batch_size": 0}, "batch_size"),
    ("decode", ([999],), {}, "outside"),
    ("encode", (5,), {}, "must be a str"),
]


@pytest.mark.parametrize(
    ("method", "args", "kwargs", "message"),
    BAD_CALLS,
    ids=[f"{m}-{i}" for i, (m, *_) in enumerate(BAD_CALLS)],
)
def test_bad_arguments_raise_a_quicksilver_error(
    tiny: qs.LLM, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(qs.QuicksilverError, match=message) as caught:
        getattr(tiny, method)(*args, **kwargs)
    policy_error = "policy" in kwargs
    assert policy_error or isinstance(caught.value, qs.InvalidArgument)
    assert isinstance(caught.value, ValueError) or policy_error
    assert tiny.engine.policy is None


def test_chat_without_a_template_is_an_invalid_argument(
    tiny: qs.LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiny.tokenizer, "chat_template", None)
    with pytest.raises(qs.InvalidArgument, match="chat template"):
        tiny.generate("hi", chat=True)


def test_a_model_without_tokenizer_works_on_ids(tmp_path: Path) -> None:
    llm = qs.load(str(save_tiny(tiny_llama(), tmp_path / "bare")), dtype="float32")
    out = llm.generate([[5, 6, 7], [8]], max_new_tokens=3, stop_ids=[])
    assert [c.text for c in out.completions] == ["", ""]
    assert all(len(c.token_ids) == 3 or c.finish_reason == "stop" for c in out.completions)
    assert llm.perplexity(list(range(3, 40)), context=16, stride=8).tokens == 36
    for call in (lambda: llm.stream([5]), lambda: llm.generate([5], stop=".")):
        with pytest.raises(qs.QuicksilverError, match="tokenizer"):
            call()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "cuda"}, "CPU only"),
        ({"dtype": "float64"}, "unknown dtype"),
        ({"dtype": torch.float64}, "not supported"),
    ],
)
def test_bad_load_arguments(tiny_dir: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(qs.InvalidArgument, match=message):
        qs.load(str(tiny_dir), **kwargs)


def test_load_rejects_a_model_that_is_not_a_name() -> None:
    with pytest.raises(qs.InvalidArgument, match="model must be"):
        qs.load(5)  # type: ignore[arg-type]


def test_public_names() -> None:
    for name in qs.__all__:
        assert hasattr(qs, name), name
    assert qs.__version__
    assert qs.DEFAULT_MODEL == "smollm2-135m"
