"""Sampled verified decoding through every surface: ``LLM.generate``, ``Batch`` and the
server give a seeded request the tokens plain sampling gives it, whatever drafts and
whichever rows run beside it (fp32, tiny random model)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tiny_models import byte_level_tokenizer, save_tiny, tiny_llama  # noqa: E402

import quicksilver as qs  # noqa: E402
from quicksilver.serve.app import Settings  # noqa: E402
from quicksilver.serve.server import BackgroundServer  # noqa: E402

PROMPT = "the cat sat on the mat, the cat sat on the mat, the cat"
# The tiny random model's logits are nearly flat: a low temperature makes them peaked enough
# that drafts are sometimes kept, sometimes not.
SAMPLING = {"temperature": 0.05, "top_k": 8}
DRAFTERS = [{"method": "ngram", "num_tokens": 3}, {"method": "auto"}, {"method": "layers"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = save_tiny(tiny_llama(), tmp_path_factory.mktemp("seeded") / "tiny")
    byte_level_tokenizer().save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> qs.LLM:
    llm = qs.load(str(model_dir), dtype="float32")
    llm.draft_plan()  # measured before the comparisons, once
    return llm


def test_generate_and_stream_follow_the_seed_not_the_drafter(llm: qs.LLM) -> None:
    for seed in range(4):
        plain = llm.generate(PROMPT, max_new_tokens=16, seed=seed, **SAMPLING)
        for drafter in DRAFTERS:
            drafted = llm.generate(
                PROMPT, max_new_tokens=16, seed=seed, speculative=drafter, **SAMPLING
            )
            assert drafted.completions[0].token_ids == plain.completions[0].token_ids
        stream = llm.stream(PROMPT, max_new_tokens=16, seed=seed, speculative="ngram", **SAMPLING)
        assert "".join(stream) == plain.text


def test_a_batch_row_follows_its_seed_beside_other_rows(llm: qs.LLM) -> None:
    alone = llm.generate(PROMPT, max_new_tokens=12, seed=3, **SAMPLING)
    batch = llm.open_batch(max_rows=4, max_len=128)
    batch.submit("a different prompt", max_new_tokens=20, temperature=0.5, speculative="auto")
    batch.submit("greedy neighbour", max_new_tokens=9, speculative="ngram")
    for _ in range(3):
        batch.step()
    (mine,) = batch.submit(PROMPT, max_new_tokens=12, seed=3, speculative="ngram", **SAMPLING)
    tokens: list[int] = []
    while batch.has_work:
        for event in batch.step():
            if event.request == mine:
                tokens += event.token_ids
    assert tokens == alone.completions[0].token_ids


def test_the_server_samples_a_seeded_request_as_plain_sampling_does(
    llm: qs.LLM, model_dir: Path
) -> None:
    plain = llm.generate(PROMPT, max_new_tokens=12, seed=11, **SAMPLING)
    settings = Settings(model_name="tiny")
    with BackgroundServer(qs.load(str(model_dir), dtype="float32"), settings) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        for drafter in [None, "ngram", {"method": "auto"}]:
            extra = {} if drafter is None else {"quicksilver": {"speculative": drafter}}
            out = client.completions.create(
                model="tiny",
                prompt=PROMPT,
                max_tokens=12,
                seed=11,
                extra_body={"top_k": 8, **extra},
                temperature=0.05,
            )
            assert out.choices[0].text == plain.text, drafter
