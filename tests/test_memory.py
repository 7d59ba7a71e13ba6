"""A finished generation's memory goes back at once: nothing it built sits in a reference
cycle, so its KV cache (up to gigabytes for a server's batch) is freed when the last
reference goes, not whenever the cyclic garbage collector next happens to run."""

from __future__ import annotations

import gc

import pytest
from tiny_models import save_tiny, tiny_llama

import quicksilver as qs


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> qs.LLM:
    directory = save_tiny(tiny_llama(), tmp_path_factory.mktemp("memory") / "tiny")
    return qs.load(str(directory), dtype="float32")


def cyclic_garbage(work) -> list[str]:
    """Type names of what ``work`` left behind in reference cycles."""
    gc.collect()
    gc.disable()
    try:
        work()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return sorted({type(thing).__name__ for thing in gc.garbage})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_generation_and_batches_leave_no_cycles(llm: qs.LLM) -> None:
    def work() -> None:
        llm.generate([[5, 6, 7, 5, 6, 7], [9, 8]], max_new_tokens=6, speculative="ngram")
        batch = llm.open_batch(max_rows=2, max_len=64, policy="paper")
        batch.submit([5, 6, 7], max_new_tokens=4, speculative="ngram")
        batch.submit([7, 8], max_new_tokens=3)
        while batch.has_work:
            batch.step()

    assert cyclic_garbage(work) == []


def test_the_check_sees_a_cycle() -> None:
    def work() -> None:
        holder: dict = {}
        holder["self"] = holder

    assert cyclic_garbage(work) == ["dict"]
