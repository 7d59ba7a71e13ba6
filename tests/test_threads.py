"""One ``LLM`` shared by threads: each call gets the answer it gets alone (calls interleave
step by step under the LLM's lock, each under its own policy), never a wrong one."""

from __future__ import annotations

import threading

import pytest
from tiny_models import byte_level_tokenizer, save_tiny, tiny_llama

import quicksilver as qs

INT4 = {"matryoshka": {"fixed_bits": 4, "decision_layer": 0}}
HALTING = {"halting": {"relative_drift": 0.1, "min_layer": 1}}


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> qs.LLM:
    directory = save_tiny(tiny_llama(), tmp_path_factory.mktemp("threads") / "tiny")
    byte_level_tokenizer().save_pretrained(str(directory))
    return qs.load(str(directory), dtype="float32")


def run_together(calls: dict[str, callable]) -> dict[str, object]:
    results: dict[str, object] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(calls))

    def work(name: str) -> None:
        barrier.wait()
        try:
            results[name] = calls[name]()
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(name,)) for name in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def test_dense_and_quantised_calls_at_once_get_their_own_answers(llm: qs.LLM) -> None:
    prompts = ["hello there", "a b c d", "the end is"]
    calls = {
        "dense": lambda: llm.generate(prompts, max_new_tokens=12).completions,
        "int4": lambda: llm.generate(prompts, max_new_tokens=12, policy=INT4).completions,
        "halting": lambda: llm.generate(prompts, max_new_tokens=12, policy=HALTING).completions,
        "stream": lambda: "".join(llm.stream("hello there", max_new_tokens=12, policy=INT4)),
        "score": lambda: llm.loglikelihood("hello", " there").logprob,
    }
    alone = {name: call() for name, call in calls.items()}
    for _ in range(3):
        together = run_together(calls)
        for name in calls:
            assert together[name] == alone[name], name
    assert llm.engine.policy is None  # every call released its policy


def test_use_is_scoped_to_its_thread(llm: qs.LLM) -> None:
    dense = llm.generate("hello", max_new_tokens=8).text
    quantised = llm.generate("hello", max_new_tokens=8, policy=INT4).text
    inside = threading.Event()
    leave = threading.Event()
    seen: dict[str, str] = {}

    def scoped() -> None:
        with llm.use(INT4):
            inside.set()
            seen["scoped"] = llm.generate("hello", max_new_tokens=8).text
            leave.wait(30)

    thread = threading.Thread(target=scoped)
    thread.start()
    inside.wait(30)
    seen["other"] = llm.generate("hello", max_new_tokens=8).text  # not under INT4
    leave.set()
    thread.join(30)
    assert seen == {"scoped": quantised, "other": dense}


def test_batches_from_two_threads_step_safely(llm: qs.LLM) -> None:
    expected = llm.generate(["one", "two"], max_new_tokens=6).completions

    def drive(prompt: str) -> str:
        batch = llm.open_batch(max_rows=2, max_len=64)
        (request,) = batch.submit(prompt, max_new_tokens=6)
        text = ""
        while batch.has_work:
            for event in batch.step():
                assert event.request == request
                text += event.text
        return text

    together = run_together({"one": lambda: drive("one"), "two": lambda: drive("two")})
    assert [together["one"], together["two"]] == [c.text for c in expected]
