"""``GenerationOptions``: one object, checked once where it is built, immutable, taken by
``generate``, ``stream`` and ``Batch.submit`` alike and handed by the server to the batch
untouched; and the API's modules share objects, not each other's private names."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import pytest
from test_text import bos_tokenizer
from tiny_models import save_tiny, tiny_llama

import quicksilver as qs
from quicksilver.api import session
from quicksilver.serve import protocol
from quicksilver.serve.metrics import Metrics
from quicksilver.serve.runner import StepRunner
from quicksilver.serve.scheduler import Job

API_DIR = Path(qs.__file__).parent / "api"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> qs.LLM:
    directory = save_tiny(tiny_llama(), tmp_path_factory.mktemp("tiny") / "bos")
    bos_tokenizer().save_pretrained(str(directory))
    return qs.load(str(directory), dtype="float32")


def test_options_are_frozen_and_normalised() -> None:
    options = qs.GenerationOptions.build(
        max_new_tokens=4, temperature=1, seed=3, stop="x", stop_ids=[7], n=2
    )
    assert options.sampling == qs.SamplingConfig(temperature=1.0, seed=3)
    assert options.stop == ("x",) and options.stop_ids == (7,) and options.n == 2
    assert options == qs.GenerationOptions.build(
        max_new_tokens=4, temperature=1.0, seed=3, stop=["x"], stop_ids=(7,), n=2
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.n = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": [""]}, "stop strings must not be empty"),
        ({"stop_ids": [-1]}, "stop_ids"),
        ({"stop_ids": "ab"}, "stop_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"logprobs": 21}, "logprobs"),
        ({"speculative": "psychic"}, "speculative"),
        ({"n": 0}, "n must be at least 1"),
        ({"temprature": 1.0}, "unknown option 'temprature'"),
    ],
)
def test_a_bad_option_is_one_line_naming_it(keywords: dict[str, Any], message: str) -> None:
    with pytest.raises(qs.InvalidArgument, match=message) as caught:
        qs.GenerationOptions.build(**keywords)
    assert "\n" not in str(caught.value)


def test_the_constructor_checks_too() -> None:
    with pytest.raises(qs.InvalidArgument, match="sampling must be a SamplingConfig"):
        qs.GenerationOptions(sampling={"temperature": 1.0})  # type: ignore[arg-type]
    with pytest.raises(qs.InvalidArgument, match="max_new_tokens"):
        qs.GenerationOptions(max_new_tokens=-3)


def test_ignored_sampling_warns_where_the_options_are_built(tiny: qs.LLM) -> None:
    with pytest.warns(UserWarning, match="top_p"):
        options = qs.GenerationOptions.build(max_new_tokens=1, top_p=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # built once: using them warns no more
        tiny.generate("hi", options)
        tiny.open_batch(max_rows=1, max_len=32).submit("hi", options)


def test_keywords_and_options_give_the_same_output(tiny: qs.LLM) -> None:
    keywords = {"max_new_tokens": 6, "temperature": 0.8, "top_k": 20, "seed": 5, "n": 2}
    by_keywords = tiny.generate(["hi", "there"], **keywords)
    by_options = tiny.generate(["hi", "there"], qs.GenerationOptions.build(**keywords))
    assert by_keywords.completions == by_options.completions
    assert len(by_options.completions) == 4  # n continuations of each prompt, in order
    streamed = tiny.stream("hi", qs.GenerationOptions.build(max_new_tokens=6))
    assert "".join(streamed) == tiny.generate("hi", max_new_tokens=6).text


def test_batch_submit_takes_options_or_keywords(tiny: qs.LLM) -> None:
    options = qs.GenerationOptions.build(max_new_tokens=5, logprobs=2)
    tokens = []
    for how in ({"options": options}, {"max_new_tokens": 5, "logprobs": 2}):
        batch = tiny.open_batch(max_rows=1, max_len=32)
        (request,) = batch.submit("hi", **how)
        got = []
        while batch.has_work:
            for event in batch.step():
                assert event.request == request and event.logprobs is not None
                got += event.token_ids
        tokens.append(got)
    assert tokens[0] == tokens[1] and len(tokens[0]) == 5


@pytest.mark.parametrize("method", ["generate", "stream"])
def test_options_and_keywords_together_are_refused(tiny: qs.LLM, method: str) -> None:
    options = qs.GenerationOptions(max_new_tokens=2)
    with pytest.raises(qs.InvalidArgument, match="not both"):
        getattr(tiny, method)("hi", options, max_new_tokens=3)
    with pytest.raises(qs.InvalidArgument, match="not both"):
        tiny.open_batch(max_rows=1, max_len=32).submit("hi", options, temperature=1.0)
    with pytest.raises(qs.InvalidArgument, match="options must be a GenerationOptions"):
        getattr(tiny, method)("hi", {"max_new_tokens": 3})


def test_what_generate_cannot_return_is_refused(tiny: qs.LLM) -> None:
    with pytest.raises(qs.InvalidArgument, match="logprobs"):
        tiny.generate("hi", logprobs=1)
    with pytest.raises(qs.InvalidArgument, match="one continuation"):
        tiny.stream("hi", n=2)


def test_a_request_is_fit_checked_once(tiny: qs.LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one fit rule runs once per request in the API, not once per prompt or copy."""
    calls = []
    rule = session.sequence_fit_error

    def counted(*args: Any) -> str | None:
        calls.append(args)
        return rule(*args)

    monkeypatch.setattr(session, "sequence_fit_error", counted)
    tiny.generate(["a", "bb"], max_new_tokens=2, n=3)
    assert len(calls) == 1
    with pytest.raises(qs.InvalidArgument, match="positions"):
        tiny.generate("hi", max_new_tokens=10_000)


def test_the_server_hands_its_options_to_the_batch_untouched(
    tiny: qs.LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"prompt": ["Hi", "there"], "max_tokens": 3, "temperature": 0.7, "seed": 1, "n": 2}
    spec = protocol.parse_completion(body, tiny, "tiny", protocol.Limits(rows=8, positions=128))
    assert isinstance(spec.options, qs.GenerationOptions)
    assert spec.options.sampling == qs.SamplingConfig(temperature=0.7, seed=1)
    received = []
    submit = qs.Batch.submit

    def spy(self: qs.Batch, prompt: Any, options: Any = None, **keywords: Any) -> list[int]:
        received.append((options, keywords))
        return submit(self, prompt, options, **keywords)

    monkeypatch.setattr(qs.Batch, "submit", spy)
    runner = StepRunner(tiny, Metrics(), max_rows=8, max_len=64)
    loop = asyncio.new_event_loop()
    try:
        runner.admit(Job(spec, None, loop))
    finally:
        loop.close()
    assert len(received) == 2
    assert all(options is spec.options and not keywords for options, keywords in received)


def _foreign_private_names(path: Path) -> list[str]:
    """``x._name`` where ``x`` is not ``self`` or ``cls``: another object's private name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        if node.attr.startswith("__") and node.attr.endswith("__"):
            continue  # dunders (__name__, __annotations__) are public protocol
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_api_module_uses_another_objects_private_names() -> None:
    found = [hit for path in sorted(API_DIR.glob("*.py")) for hit in _foreign_private_names(path)]
    assert found == []


def test_submit_checks_the_prompt_side_as_generate_does(tiny: qs.LLM) -> None:
    with pytest.raises(qs.InvalidArgument, match="chat must be"):
        tiny.open_batch(max_rows=1, max_len=32).submit("hi", chat="yes")


def test_the_server_refuses_what_its_rows_cannot_hold_before_queueing(tiny: qs.LLM) -> None:
    """Against the server's positions per row (``--max-context``), not the model's: every
    prompt of a request fits, or the request is refused whole with a 400."""
    from quicksilver.serve.errors import APIError

    limits = protocol.Limits(rows=8, positions=16)
    body = {"prompt": [[5, 6], list(range(3, 20))], "max_tokens": 2}
    with pytest.raises(APIError, match="more than the server's context of 16"):
        protocol.parse_completion(body, tiny, "tiny", limits)
    body = {"prompt": [[5, 6], list(range(3, 13))], "max_tokens": 8}
    with pytest.raises(APIError, match="server's context of 16"):
        protocol.parse_completion(body, tiny, "tiny", limits)
