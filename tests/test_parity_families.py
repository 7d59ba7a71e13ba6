"""Every supported family against transformers' own implementation, on tiny random models.

The tiny checkpoints exercise the HF-directory loaders (GPT-2's Conv1D transposes, OPT's
post-norm and projected embeddings, Llama's GQA, untied head and Llama-3 RoPE scaling) and
the engine's cache and left-padding paths without downloading anything.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_models import SPECIAL_IDS, TINY_MODELS, VOCAB, save_tiny, save_tiny_gguf, tiny_opt

from quicksilver.models import formats, loading
from quicksilver.runtime.engine import Engine
from quicksilver.runtime.generate import generate

NEW_TOKENS = 16


class TinyZoo:
    """Builds, saves and loads each tiny model once per module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.reference: dict[str, torch.nn.Module] = {}
        self.ours: dict[tuple[str, bool], loading.LoadedModel] = {}

    def hf(self, name: str) -> torch.nn.Module:
        if name not in self.reference:
            model = TINY_MODELS[name]()
            save_tiny(model, self.root / name, with_tokenizer=name == "gpt2")
            self.reference[name] = model
        return self.reference[name]

    def load(self, name: str, fast: bool) -> loading.LoadedModel:
        if (name, fast) not in self.ours:
            self.hf(name)
            self.ours[name, fast] = loading.load(str(self.root / name), "float32", fast=fast)
        return self.ours[name, fast]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> TinyZoo:
    return TinyZoo(tmp_path_factory.mktemp("tiny_models"))


def _tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    # Skip the special ids so no row starts with padding by accident.
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def _hf_greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=SPECIAL_IDS["pad"],
    )
    return out[:, ids.shape[1] :].tolist()


def _left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), SPECIAL_IDS["pad"], dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    return ids, mask


NAMES = list(TINY_MODELS)
FAST = [pytest.param(True, id="fast"), pytest.param(False, id="plain")]


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("name", NAMES)
def test_prefill_logits_match_transformers(zoo: TinyZoo, name: str, fast: bool) -> None:
    tokens = _tokens(2, 12, seed=1)
    engine = Engine(zoo.load(name, fast).model)
    ours = engine.forward(tokens, engine.new_cache(2, 12), logits_at="all")
    with torch.no_grad():
        reference = zoo.hf(name)(tokens).logits
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_cached_decode_logits_match_transformers(zoo: TinyZoo, name: str) -> None:
    """Prefill 8 tokens, then feed 4 one at a time: the KV-cache path must not drift."""
    tokens = _tokens(2, 12, seed=2)
    engine = Engine(zoo.load(name, True).model)
    cache = engine.new_cache(2, 12)
    steps = [engine.forward(tokens[:, :8], cache, logits_at="all")]
    steps += [engine.forward(tokens[:, i : i + 1], cache, logits_at="all") for i in range(8, 12)]
    with torch.no_grad():
        reference = zoo.hf(name)(tokens).logits
    torch.testing.assert_close(torch.cat(steps, dim=1), reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_matches_transformers(zoo: TinyZoo, name: str) -> None:
    prompts = _tokens(2, 10, seed=3)
    ours = generate(
        Engine(zoo.load(name, True).model), prompts.tolist(), NEW_TOKENS, ignore_eos=True
    )
    expected = _hf_greedy(zoo.hf(name), prompts, torch.ones_like(prompts))
    assert ours.tokens == expected


@pytest.mark.parametrize("name", NAMES)
def test_ragged_batch_matches_each_prompt_alone(zoo: TinyZoo, name: str) -> None:
    lengths = (5, 12, 8)
    prompts = [_tokens(1, n, seed=10 + n)[0].tolist() for n in lengths]
    engine = Engine(zoo.load(name, True).model)
    batched = generate(engine, prompts, NEW_TOKENS, ignore_eos=True).tokens
    alone = [generate(engine, [p], NEW_TOKENS, ignore_eos=True).tokens[0] for p in prompts]
    assert batched == alone
    # transformers on the same left-padded batch, positions derived from the attention mask.
    ids, mask = _left_pad(prompts)
    assert batched == _hf_greedy(zoo.hf(name), ids, mask)


def test_tokenizer_is_loaded_when_present_and_none_otherwise(zoo: TinyZoo) -> None:
    with_tokenizer = zoo.load("gpt2", True).tokenizer
    assert with_tokenizer is not None
    ids = with_tokenizer.encode("hi!")
    assert len(ids) == 3 and max(ids) < VOCAB
    assert with_tokenizer.decode(ids) == "hi!"
    assert zoo.load("opt_pre_norm", True).tokenizer is None


def test_pickled_bin_checkpoint_loads_with_weights_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_opt(seed=4, pre_norm=False, word_embed_proj_dim=32)
    directory = save_tiny(model, tmp_path / "opt_bin", safetensors=False)
    assert not list(directory.glob("*.safetensors"))

    calls: list[dict] = []
    real_load: Callable = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = loading.load(str(directory), "float32")
    assert calls and all(call.get("weights_only") is True for call in calls)

    tokens = _tokens(2, 12, seed=5)
    engine = Engine(loaded.model)
    ours = engine.forward(tokens, engine.new_cache(2, 12), logits_at="all")
    with torch.no_grad():
        reference = model(tokens).logits
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


def test_bfloat16_load_stays_close(zoo: TinyZoo) -> None:
    """bf16 weights cannot match to 1e-4, but must still track the fp32 reference."""
    tokens = _tokens(2, 12, seed=6)
    zoo.hf("llama_gqa")
    loaded = loading.load(str(zoo.root / "llama_gqa"), "bfloat16")
    engine = Engine(loaded.model)
    ours = engine.forward(tokens, engine.new_cache(2, 12), logits_at="all").float()
    with torch.no_grad():
        reference = zoo.hf("llama_gqa")(tokens).logits
    agree = (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert agree > 0.8


@pytest.mark.parametrize("name", ["llama_gqa", "llama3_rope"])
def test_gguf_export_matches_transformers(zoo: TinyZoo, tmp_path: Path, name: str) -> None:
    """The GGUF reader (Q/K un-interleaving, rope_freqs divisors) against transformers.

    40 positions reach past the Llama-3 scaling's 32-token original context.
    """
    path = save_tiny_gguf(zoo.hf(name), tmp_path / f"{name}.gguf")
    tokens = _tokens(2, 40, seed=7)
    with torch.no_grad():
        reference = zoo.hf(name)(tokens).logits
    for _ in range(2):  # the second load comes from the converted-weights cache
        loaded = loading.load(str(path), "float32", cache_dir=tmp_path / "cache")
        assert loaded.tokenizer is None  # the file carries no vocabulary
        engine = Engine(loaded.model)
        ours = engine.forward(tokens, engine.new_cache(2, 40), logits_at="all")
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
    assert (tmp_path / "cache" / "converted").is_dir()


# Block formats of a Q4_K_M file (Qwen2.5-Coder-0.5B's mix), each on some tensor: F32 and
# biases, Q8_0 and Q5_0 quantised from the weights, Q4_K / Q6_K random blocks.
QWEN2_BLOCKS = {
    "attn_q": "Q5_0",
    "attn_k": "Q8_0",
    "attn_v": "Q5_1",
    "attn_output": "Q4_0",
    "ffn_gate": "Q4_1",
    "ffn_down": "Q4_K",
    "output": "Q8_0",
}


@pytest.mark.parametrize("down", ["Q4_K", "Q5_K", "Q6_K"])
def test_qwen2_gguf_with_block_formats_matches_transformers(tmp_path: Path, down: str) -> None:
    """A Qwen2 GGUF (no Q/K interleaving, Q/K/V biases) in the block formats people use,
    read by our loader, against transformers holding the file's dequantised values."""
    from tiny_models import gguf_reference, tiny_qwen2

    model = tiny_qwen2(intermediate_size=256)
    path = save_tiny_gguf(
        model, tmp_path / "qwen2.gguf", "qwen2", QWEN2_BLOCKS | {"ffn_down": down}
    )
    reference = gguf_reference(model, path)
    tokens = _tokens(2, 24, seed=3)
    with torch.no_grad():
        expected = reference(tokens).logits
    loaded = loading.load(str(path), "float32", cache_dir=tmp_path / "cache")
    assert loaded.model.config.qkv_bias
    engine = Engine(loaded.model)
    ours = engine.forward(tokens, engine.new_cache(2, 24), logits_at="all")
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_q4_k_layers_load_into_int4_as_they_are(tmp_path: Path) -> None:
    """int4 with groups of 32 takes a Q4_K down projection's codes, scales and mins as they
    are (the same values as the file's, up to the scales' rounding to the dtype), and
    re-quantises the other layers with the error measured and reported."""
    from tiny_models import tiny_qwen2

    path = save_tiny_gguf(
        tiny_qwen2(intermediate_size=256), tmp_path / "q.gguf", "qwen2", QWEN2_BLOCKS
    )
    fmt = formats.WeightFormat(blocks="int4", group_size=32)
    dense = loading.load(str(path), "float32", cache_dir=tmp_path / "cache")
    quantised = loading.load(str(path), "float32", cache_dir=tmp_path / "cache", weights=fmt)
    for i in range(2):
        file_values = dense.model.blocks[i].mlp.down.dense_weight()
        held = quantised.model.blocks[i].mlp.down.dense_weight()
        torch.testing.assert_close(held, file_values, atol=0, rtol=0)
    report = quantised.requantised
    assert report is not None
    assert (report.kept, report.kept_types) == (4, ("Q4_0", "Q4_K"))
    assert report.rounded == 4 and report.rounded_types == ("F32", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
    assert 0 < report.relative_error < 0.2 and report.head_type == "Q8_0"
    assert "kept as they are" in report.message() and "re-quantised" in report.message()
