"""``stop_ids`` have one meaning everywhere: they end a row in addition to the model's EOS.
``ignore_eos=True`` (as in vLLM's SamplingParams) turns the EOS stop off, the only way to
generate past EOS, in the engine (``runtime.generate.generate``) and the API (``LLM.generate``,
``LLM.stream``, ``Batch.submit``) alike.

The model is a tiny random Llama whose config names as EOS a token its greedy continuation
reaches a few steps in, so the EOS stop is exercised without a trained model.
"""

from __future__ import annotations

import pytest
from tiny_models import save_tiny, tiny_llama

import quicksilver as qs
from quicksilver.runtime.engine import Engine
from quicksilver.runtime.generate import generate

PROMPT = [5, 6, 7, 8]
NEW = 12


@pytest.fixture(scope="module")
def greedy(tmp_path_factory: pytest.TempPathFactory) -> list[int]:
    """The greedy tokens of the model with no EOS at all: what every test cuts."""
    model = tiny_llama()
    model.config.eos_token_id = None
    llm = qs.load(str(save_tiny(model, tmp_path_factory.mktemp("stop") / "free")), dtype="float32")
    tokens = generate(llm.engine, [PROMPT], NEW).tokens[0]
    assert len(tokens) == NEW
    return tokens


def _first_new(tokens: list[int], start: int) -> int:
    """The first position at or after ``start`` whose token did not occur before it."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


@pytest.fixture(scope="module")
def eos_at(greedy: list[int]) -> int:
    """Where the EOS chosen for the model first appears in its greedy tokens."""
    return _first_new(greedy, 4)


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory, greedy: list[int], eos_at: int) -> qs.LLM:
    model = tiny_llama()
    model.config.eos_token_id = greedy[eos_at]
    directory = save_tiny(model, tmp_path_factory.mktemp("stop") / "eos", with_tokenizer=True)
    loaded = qs.load(str(directory), dtype="float32")
    assert loaded.config.eos_token_ids == [greedy[eos_at]]
    return loaded


def test_engine_stops_at_eos_by_default(llm: qs.LLM, greedy: list[int], eos_at: int) -> None:
    result = generate(llm.engine, [PROMPT], NEW)
    assert result.tokens[0] == greedy[: eos_at + 1]
    assert result.finish_reasons == ["stop"]


def test_engine_stop_ids_add_to_eos(llm: qs.LLM, greedy: list[int], eos_at: int) -> None:
    engine: Engine = llm.engine
    early = _first_new(greedy, 1)
    assert early < eos_at
    assert (
        generate(engine, [PROMPT], NEW, stop_ids=[greedy[early]]).tokens[0] == greedy[: early + 1]
    )
    # A stop id greedy never reaches does not switch the EOS stop off (it used to replace it).
    unseen = next(t for t in range(3, 300) if t not in greedy)
    assert generate(engine, [PROMPT], NEW, stop_ids=[unseen]).tokens[0] == greedy[: eos_at + 1]
    assert generate(engine, [PROMPT], NEW, stop_ids=[]).tokens[0] == greedy[: eos_at + 1]


def test_engine_ignore_eos_runs_to_max_new_tokens(
    llm: qs.LLM, greedy: list[int], eos_at: int
) -> None:
    result = generate(llm.engine, [PROMPT], NEW, ignore_eos=True)
    assert result.tokens[0] == greedy and result.finish_reasons == ["length"]
    late = _first_new(greedy, eos_at + 1)
    stopped = generate(llm.engine, [PROMPT], NEW, stop_ids=[greedy[late]], ignore_eos=True)
    assert stopped.tokens[0] == greedy[: late + 1]


def test_api_generate_and_stream(llm: qs.LLM, greedy: list[int], eos_at: int) -> None:
    out = llm.generate(PROMPT, max_new_tokens=NEW)
    assert out.completions[0].token_ids == greedy[: eos_at + 1]
    assert out.completions[0].finish_reason == "stop"
    unseen = next(t for t in range(3, 300) if t not in greedy)
    out = llm.generate(PROMPT, max_new_tokens=NEW, stop_ids=[unseen])
    assert out.completions[0].token_ids == greedy[: eos_at + 1]
    free = llm.generate(PROMPT, max_new_tokens=NEW, ignore_eos=True).completions[0]
    assert free.token_ids == greedy and free.finish_reason == "length"
    late = _first_new(greedy, eos_at + 1)
    cut = llm.generate(PROMPT, max_new_tokens=NEW, stop_ids=[greedy[late]], ignore_eos=True)
    assert cut.completions[0].token_ids == greedy[: late + 1]
    for ignore_eos, expected in ((False, greedy[: eos_at + 1]), (True, greedy)):
        stream = llm.stream(PROMPT, max_new_tokens=NEW, ignore_eos=ignore_eos)
        text = "".join(stream)
        assert stream.output.completions[0].token_ids == expected
        assert text == stream.output.text


def test_batch_submit_ignore_eos(llm: qs.LLM, greedy: list[int], eos_at: int) -> None:
    batch = llm.open_batch(max_rows=2, max_len=64)
    stopping = batch.submit(PROMPT, max_new_tokens=NEW)[0]
    free = batch.submit(PROMPT, max_new_tokens=NEW, ignore_eos=True)[0]
    done: dict[int, qs.Completion] = {}
    while batch.has_work:
        for event in batch.step():
            if event.completion is not None:
                done[event.request] = event.completion
    assert done[stopping].token_ids == greedy[: eos_at + 1]
    assert done[free].token_ids == greedy and done[free].finish_reason == "length"


@pytest.mark.parametrize("value", [1, "yes", None])
def test_ignore_eos_must_be_a_bool(llm: qs.LLM, value: object) -> None:
    with pytest.raises(qs.InvalidArgument, match="ignore_eos must be True or False"):
        llm.generate(PROMPT, max_new_tokens=2, ignore_eos=value)  # type: ignore[arg-type]
