"""Adapters on tiny random models: the training forward is the engine's, losses go down,
files round-trip, resuming is exact, and loading applies (or refuses) an adapter."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_accounting import TINY, random_model
from tiny_models import save_tiny, tiny_llama

import quicksilver as qs
from quicksilver import adapt
from quicksilver.adapt.exits import ExitHeads
from quicksilver.adapt.forward import inference_logits, training_logits
from quicksilver.adapt.lora import LoRA, merge_into
from quicksilver.api.drafting import plan_key
from quicksilver.cli.main import main
from quicksilver.errors import QuicksilverError
from quicksilver.policies import load_policy
from quicksilver.policies.base import LayerView, TokenState
from quicksilver.policies.skipdecode import SkipDecode
from quicksilver.runtime.engine import Engine

CONFIG = dataclasses.replace(TINY, n_layers=5, max_position_embeddings=256)
SCHEDULE = load_policy(None).replacing(SkipDecode(4, 2, 6, 1))
FAST = adapt.TrainingSettings(steps=6, batch_size=2, seq_len=24, lr=3e-3, checkpoint_every=3)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny products: a second thread only adds contention
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapt")
    save_tiny(tiny_llama(), root / "model", with_tokenizer=True)
    docs = [" ".join(f"word{(i * 7 + j) % 13} n{j % 5}" for j in range(40)) for i in range(30)]
    (root / "text.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root


def random_lora(model, seed: int = 1) -> LoRA:
    lora = LoRA(model, rank=4)
    torch.manual_seed(seed)
    for parameter in lora.parameters():
        parameter.data.normal_(0, 0.1)  # B = 0 would make the adapter a no-op
    return lora


@pytest.mark.parametrize("policy", [None, SCHEDULE], ids=["dense", "skipdecode"])
def test_training_forward_equals_engine_with_merged_weights(policy) -> None:
    model = random_model(CONFIG, fast=False)
    lora = random_lora(model)
    tokens = torch.randint(
        0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    handles = lora.attach(model)
    trained = training_logits(Engine(model, policy=policy), tokens, prompt_tokens=6)
    trained.logsumexp(-1).mean().backward()
    for handle in handles:
        handle.remove()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.parameters())
    merged = copy.deepcopy(model)
    merge_into(merged, lora.deltas())
    reference = inference_logits(Engine(merged, policy=policy), tokens, prompt_tokens=6)
    torch.testing.assert_close(trained.detach(), reference, atol=1e-5, rtol=1e-5)
    frozen = inference_logits(Engine(model, policy=policy), tokens, prompt_tokens=6)
    assert not torch.allclose(frozen, reference, atol=1e-3)  # the adapter did change something


def test_schedule_changes_generated_positions_only() -> None:
    model = random_model(CONFIG, fast=False)
    tokens = torch.randint(
        0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    dense = inference_logits(Engine(model), tokens)
    scheduled = training_logits(Engine(model, policy=SCHEDULE), tokens, prompt_tokens=6).detach()
    torch.testing.assert_close(scheduled[:, :6], dense[:, :6])
    assert not torch.allclose(scheduled[:, 7:], dense[:, 7:], atol=1e-3)


def test_identity_exit_heads_reproduce_the_logit_lens() -> None:
    model = random_model(CONFIG, fast=False)
    states = torch.randn(7, CONFIG.hidden_size)
    view = LayerView(
        2,
        model,
        TokenState.start(torch.ones(1, 7, dtype=torch.bool)),
        torch.arange(7),
        states,
        states,
    )
    raw = view.lens_entropy()
    raw_flops = view.check_flops
    model.exit_heads = ExitHeads(CONFIG.n_layers, CONFIG.hidden_size)
    tuned = LayerView(2, model, view.state, view.index, states, states)
    assert torch.equal(tuned.lens_entropy(), raw)
    d = CONFIG.hidden_size
    assert tuned.check_flops == raw_flops + 7 * (2 * d + 1) * d  # the head's cost is counted


def test_skipdecode_adapter_trains_round_trips_and_loads(tiny_dir: Path) -> None:
    out = tiny_dir / "skip.safetensors"
    settings = dataclasses.replace(FAST, steps=12)
    result = adapt.adapt_skipdecode(
        tiny_dir / "model",
        1.3,
        12,
        settings,
        rank=4,
        data=tiny_dir / "text.jsonl",
        output=out,
        progress=False,
    )
    record = adapt.read_adapter(out).record
    assert record == json.loads(json.dumps(result.record))
    assert record["kind"] == "skipdecode" and record["steps"] == 12 and record["tokens"] == 12 * 48
    assert record["schedule"]["skipdecode"]["min_layers"] < 3
    curve = record["loss_curve"]
    assert sum(curve[-4:]) < sum(curve[:4])
    validation = record["validation"]
    assert validation["adapted"]["kl"] < validation["frozen"]["kl"]
    # Loading merges the update: the loaded weights are the frozen ones plus B A * scale.
    frozen = qs.load(tiny_dir / "model", dtype="float32")
    adapted = qs.load(tiny_dir / "model", dtype="float32", adapter=out)
    loaded = adapt.read_adapter(out)
    a = loaded.tensors["blocks.1.mlp.up.lora_a"]
    b = loaded.tensors["blocks.1.mlp.up.lora_b"]
    expected = frozen.model.blocks[1].mlp.up.weight + b @ a * record["alpha"] / record["rank"]
    torch.testing.assert_close(adapted.model.blocks[1].mlp.up.weight, expected)
    quantised = qs.load(tiny_dir / "model", dtype="float32", weights="int8", adapter=out)
    assert quantised.generate("word1", max_new_tokens=3).completions[0].text is not None


def test_resume_equals_an_uninterrupted_run(tiny_dir: Path) -> None:
    common = dict(data=tiny_dir / "text.jsonl", progress=False)
    whole = adapt.fit_exit_heads(tiny_dir / "model", FAST, output=tiny_dir / "whole.st", **common)
    checkpoint = tiny_dir / "run.ckpt"
    first = dataclasses.replace(FAST, steps=3)
    adapt.fit_exit_heads(
        tiny_dir / "model", first, output=tiny_dir / "half.st", checkpoint=checkpoint, **common
    )
    resumed = adapt.fit_exit_heads(
        tiny_dir / "model", FAST, output=tiny_dir / "resumed.st", checkpoint=checkpoint, **common
    )
    assert resumed.record["loss_curve"] == whole.record["loss_curve"]
    a, b = adapt.read_adapter(whole.path), adapt.read_adapter(resumed.path)
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name])
    kl = whole.record["validation_kl_by_layer"]
    assert sum(kl["exit_heads"]) < sum(kl["logit_lens"])
    with pytest.raises(QuicksilverError, match="other settings"):
        other = dataclasses.replace(FAST, lr=1e-2)
        adapt.fit_exit_heads(tiny_dir / "model", other, checkpoint=checkpoint, **common)


def test_exit_heads_load_and_feed_halting(tiny_dir: Path) -> None:
    out = tiny_dir / "exits.safetensors"
    adapt.fit_exit_heads(
        tiny_dir / "model", FAST, data=tiny_dir / "text.jsonl", output=out, progress=False
    )
    llm = qs.load(tiny_dir / "model", dtype="float32", adapter=out)
    assert isinstance(llm.model.exit_heads, ExitHeads)
    policy = {"halting": {"entropy_bits": 100.0, "min_layer": 0}}  # everyone halts after layer 0
    halted = llm.generate("word1 word2", max_new_tokens=3, policy=policy)
    plain = qs.load(tiny_dir / "model", dtype="float32").generate(
        "word1 word2", max_new_tokens=3, policy=policy
    )
    assert halted.flops_per_token > plain.flops_per_token  # the heads' products are counted
    # a drafting plan measured with the heads (early-exit drafts) is kept apart from the
    # frozen model's; without an adapter the key is the one it always was
    frozen = qs.load(tiny_dir / "model", dtype="float32")
    assert plan_key(llm, "dense")["adapter"].startswith("adapter:")
    assert "adapter" not in plan_key(frozen, "dense")


def test_exit_heads_from_a_first_layer_leave_earlier_layers_to_the_logit_lens(
    tiny_dir: Path,
) -> None:
    common = dict(data=tiny_dir / "text.jsonl", progress=False)
    out = tiny_dir / "late.safetensors"
    result = adapt.fit_exit_heads(tiny_dir / "model", FAST, first_layer=1, output=out, **common)
    assert result.record["layers"] == [1]  # the tiny model has 3 layers: heads for 0 and 1
    tensors = adapt.read_adapter(out).tensors
    weight, bias = tensors["exit_heads.weight"], tensors["exit_heads.bias"]
    assert torch.equal(weight[0], torch.eye(weight.shape[-1])) and not bias[0].any()
    assert not torch.equal(weight[1], torch.eye(weight.shape[-1]))
    kl = result.record["validation_kl_by_layer"]
    assert kl["exit_heads"][0] == kl["logit_lens"][0] and kl["exit_heads"][1] < kl["logit_lens"][1]
    with pytest.raises(QuicksilverError, match="first_layer must be 0..1"):
        adapt.fit_exit_heads(tiny_dir / "model", FAST, first_layer=2, **common)


def test_adapter_for_another_model_is_refused(tiny_dir: Path) -> None:
    out = tiny_dir / "exits.safetensors"
    if not out.exists():
        adapt.fit_exit_heads(
            tiny_dir / "model", FAST, data=tiny_dir / "text.jsonl", output=out, progress=False
        )
    other = save_tiny(tiny_llama(seed=1), tiny_dir / "other", with_tokenizer=True)
    with pytest.raises(QuicksilverError, match="was trained on") as err:
        qs.load(other, adapter=out)
    assert "\n" not in str(err.value)
    with pytest.raises(QuicksilverError, match="does not exist"):
        qs.load(tiny_dir / "model", adapter=tiny_dir / "missing.safetensors")


def test_cli_adapt_then_generate(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tiny_dir / "cli.safetensors"
    args = ["--model", str(tiny_dir / "model"), "--data", str(tiny_dir / "text.jsonl")]
    sizes = ["--steps", "2", "--batch-size", "2", "--seq-len", "24", "--output", str(out)]
    assert (
        main(
            [
                "adapt",
                "skipdecode",
                *args,
                *sizes,
                "--target-speedup",
                "1.3",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    assert str(out) in capsys.readouterr().out
    model = ["--model", str(tiny_dir / "model"), "--adapter", str(out), "--prompt", "word1"]
    assert main(["generate", *model, "--max-new-tokens", "4", "--target-speedup", "1.3"]) == 0
    assert main(["adapt", "exits", *args, *sizes, "--steps", "0"]) == 2
    assert "--steps must be a positive integer" in capsys.readouterr().err
