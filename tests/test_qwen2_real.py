"""The second real model, Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF: qwen2 architecture,
Q5_0 / Q8_0 / Q4_K / Q6_K blocks, a 151,936-token vocabulary), against transformers reading
the same file. ``make test`` installs it (``quicksilver models --install
qwen2.5-coder-0.5b``); where it is not installed these tests are skipped, saying so.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import quicksilver as qs
from quicksilver.errors import QuicksilverError
from quicksilver.models import loading
from quicksilver.runtime.engine import Engine

NAME = "qwen2.5-coder-0.5b"
CODE = (
    "def quicksort(items):\n"
    "    if len(items) <= 1:\n"
    "        return items\n"
    "    pivot = items[len(items) // 2]\n"
)


@pytest.fixture(scope="module")
def qwen_path() -> Path:
    try:
        return Path(loading.resolve(NAME).path)
    except QuicksilverError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def ours(qwen_path: Path) -> qs.LLM:
    return qs.load(NAME, dtype="float32")


@pytest.fixture(scope="module")
def theirs(qwen_path: Path):
    """transformers' Qwen2 on the same GGUF file, dequantised by its own reader."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(qwen_path.parent), gguf_file=qwen_path.name, dtype=torch.float32
    )
    model.generation_config.pad_token_id = model.generation_config.eos_token_id
    return model.eval()


def test_config_and_tokenizer(ours: qs.LLM) -> None:
    config = ours.config
    assert (config.n_layers, config.hidden_size, config.n_heads, config.n_kv_heads) == (
        24,
        896,
        14,
        2,
    )
    assert config.qkv_bias and not config.tie_word_embeddings
    assert config.vocab_size == 151_936 and config.rope_theta == 1e6
    assert "<|im_start|>" in ours.tokenizer.chat_template


def test_fp32_logits_and_greedy_tokens_equal_transformers(ours: qs.LLM, theirs) -> None:
    ids = torch.tensor([ours.tokenizer.encode(CODE)])
    engine = Engine(ours.model)
    with torch.no_grad():
        expected = theirs(ids).logits
        logits = engine.forward(ids, engine.new_cache(1, ids.shape[1]), logits_at="all")
    relative = float((logits - expected).abs().max() / expected.abs().max())
    assert relative <= 1e-4
    with torch.no_grad():
        reference = theirs.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None)
    tokens = ours.generate(ids[0].tolist(), max_new_tokens=24).completions[0].token_ids
    expected_tokens = reference[0, ids.shape[1] :].tolist()
    assert tokens == expected_tokens[: len(tokens)]
    # Ours stops at EOS (kept in the tokens); transformers was told not to.
    assert len(tokens) == 24 or tokens[-1] in ours.config.eos_token_ids


def test_perplexity_equals_transformers_on_the_same_windows(ours: qs.LLM, theirs) -> None:
    """One perplexity figure (two 256-token windows of code-like text) within 0.1%."""
    text = (CODE * 4) + "\n".join(f"value_{i} = compute({i}, scale={i * 0.5})" for i in range(60))
    ids = ours.tokenizer.encode(text)[:384]
    result = ours.perplexity(ids, context=256, stride=128)
    with torch.no_grad():
        logits = theirs(torch.tensor([ids[:256]])).logits[0].log_softmax(-1)
        nll = -logits[:-1].gather(1, torch.tensor(ids[1:256]).unsqueeze(1)).sum()
        second = theirs(torch.tensor([ids[128:384]])).logits[0].log_softmax(-1)
        tail = torch.tensor(ids[257:384]).unsqueeze(1)
        nll += -second[128:-1].gather(1, tail).sum()
    reference = math.exp(float(nll) / 383)
    assert result.tokens == 383
    assert abs(result.ppl / reference - 1) <= 1e-3


def test_int4_keeps_the_q4_k_layers_and_reports_the_rest(qwen_path: Path) -> None:
    llm = qs.load(NAME, weights="int4")
    report = llm.requantised
    assert report is not None
    assert (report.kept, report.kept_types) == (12, ("Q4_K",))
    assert report.rounded == 84 and "Q5_0" in report.rounded_types
    assert 0 < report.relative_error < 0.2 and report.head_type == "Q8_0"
    out = llm.generate(CODE, max_new_tokens=8)
    assert out.completions[0].token_ids


def test_server_chat_round_trip(qwen_path: Path) -> None:
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from quicksilver.serve.app import Settings
    from quicksilver.serve.server import BackgroundServer

    reference = qs.load(NAME)
    question = "Write a Python function that adds two numbers."
    messages = [{"role": "user", "content": question}]
    expected = reference.generate(question, max_new_tokens=12, chat=True).text
    with BackgroundServer(qs.load(NAME), Settings(model_name=NAME)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=12, temperature=0
        )
    assert reply.choices[0].message.content == expected
    assert expected.strip()
