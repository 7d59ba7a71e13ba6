"""The converted-model cache proves itself: each entry records SHA-256 hashes of its files and
tensors; a load checks the cheap ones (sizes, header, config, tokenizer), a full verification
hashes every tensor, and a damaged entry is named, removed and rebuilt, never used silently."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny, save_tiny_gguf, tiny_gpt2, tiny_llama

from quicksilver.cli import main
from quicksilver.models import loading

DAMAGED_TENSOR = "blocks.1.mlp.up.weight"


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = save_tiny_gguf(tiny_llama(), tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return path.read_bytes()


@pytest.fixture
def gguf_path(tmp_path: Path, tiny_gguf_bytes: bytes) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny_gguf_bytes)
    return path


def _entry(cache: Path) -> Path:
    entries = [p for p in (cache / "converted").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1, entries
    return entries[0]


def _tensor_range(weights: Path, name: str) -> tuple[int, int]:
    """A tensor's [start, end) in a safetensors file, read from the header independently."""
    with weights.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    start, end = header[name]["data_offsets"]
    return 8 + size + start, 8 + size + end


def _flip_bytes_inside(weights: Path, name: str) -> None:
    """Overwrite bytes in the middle of one tensor: no size changes, the header is intact."""
    start, end = _tensor_range(weights, name)
    middle = (start + end) // 2
    with weights.open("r+b") as f:
        f.seek(middle)
        original = f.read(8)
        f.seek(middle)
        f.write(bytes(b ^ 0xFF for b in original))


def _all_weights_equal(a: loading.LoadedModel, b: loading.LoadedModel) -> bool:
    left, right = a.model.state_dict(), b.model.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_manifest_records_the_hash_of_every_file_and_tensor(gguf_path: Path, tmp_path: Path):
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    loading.load(str(gguf_path), cache_dir=cache)
    entry = _entry(cache)
    manifest = json.loads((entry / "complete").read_text())
    config_hash = hashlib.sha256((entry / "config.json").read_bytes()).hexdigest()
    assert manifest["sha256"]["config.json"] == config_hash
    tensors = load_file(str(entry / "model.safetensors"))
    recorded = manifest["weights"]["tensors"]
    assert recorded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert recorded[name] == hashlib.sha256(tensor.numpy().tobytes()).hexdigest(), name


def test_whole_entry_verifies(gguf_path: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    lm = loading.load(str(gguf_path), cache_dir=cache)
    assert lm.cache_entry == _entry(cache)
    assert lm.verify_cache() is None
    assert loading.verify_entry_for(str(gguf_path), cache_dir=cache) is None
    assert _entry(cache).is_dir()


def test_nothing_to_verify_without_a_cache_entry(tmp_path: Path, gguf_path: Path) -> None:
    directory = save_tiny(tiny_gpt2(), tmp_path / "gpt2")
    assert loading.load(str(directory)).verify_cache() is None  # HF weights: no cache
    assert loading.verify_entry_for(str(directory)) is None
    assert loading.verify_entry_for(str(gguf_path), cache_dir=tmp_path / "empty") is None


@pytest.mark.parametrize("hook", ["verify_entry_for", "LoadedModel.verify_cache"])
def test_bytes_flipped_inside_a_tensor(
    gguf_path: Path, tmp_path: Path, hook: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    clean = loading.load(str(gguf_path), cache_dir=cache)
    entry = _entry(cache)
    _flip_bytes_inside(entry / "model.safetensors", DAMAGED_TENSOR)
    # No size changed, so the cheap check at load cannot see it: the weights differ.
    poisoned = loading.load(str(gguf_path), cache_dir=cache)
    assert not _all_weights_equal(clean, poisoned)
    if hook == "verify_entry_for":
        message = loading.verify_entry_for(str(gguf_path), cache_dir=cache)
    else:
        message = poisoned.verify_cache()
    assert message == (
        f"the cached conversion at {entry} is damaged (tensor {DAMAGED_TENSOR} hash mismatch); "
        "it was removed and will be rebuilt on the next load"
    )
    assert not entry.exists()
    capsys.readouterr()
    rebuilt = loading.load(str(gguf_path), cache_dir=cache)
    assert _entry(cache) == entry and _all_weights_equal(clean, rebuilt)
    assert loading.verify_entry_for(str(gguf_path), cache_dir=cache) is None


def _edit_config(entry: Path) -> None:
    """Valid JSON of the same size whose RoPE base differs: only the hash can tell."""
    config = entry / "config.json"
    text = config.read_text()
    edited = text.replace('"rope_theta": 10000.0', '"rope_theta": 90000.0')
    assert edited != text and len(edited) == len(text)
    config.write_text(edited)


def _truncate_tensor_file(entry: Path) -> None:
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _truncate_config(entry: Path) -> None:
    config = entry / "config.json"
    config.write_bytes(config.read_bytes()[:-2])


def _edit_header(entry: Path) -> None:
    """Rename a tensor in the safetensors header, keeping its length: still a valid file."""
    weights = entry / "model.safetensors"
    data = weights.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + size]
    edited = header.replace(b'"blocks.0.attn_norm.weight"', b'"blocks.0.attn_norm.weighu"')
    assert edited != header
    weights.write_bytes(data[:8] + edited + data[8 + size :])


CHEAP_DAMAGE = {
    "edited config": (_edit_config, "config.json hash mismatch"),
    "truncated weights": (_truncate_tensor_file, "model.safetensors has"),
    "truncated config": (_truncate_config, "config.json has"),
    "edited weights header": (_edit_header, "model.safetensors header hash mismatch"),
}


@pytest.mark.parametrize("damage", CHEAP_DAMAGE)
def test_cheap_check_at_load_rebuilds(
    gguf_path: Path, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    clean = loading.load(str(gguf_path), cache_dir=cache)
    entry = _entry(cache)
    harm, reason = CHEAP_DAMAGE[damage]
    harm(entry)
    capsys.readouterr()
    rebuilt = loading.load(str(gguf_path), cache_dir=cache)
    err = capsys.readouterr().err
    assert f"warning: the converted-model cache entry {entry} is damaged (" in err, err
    assert reason in err, err
    assert _all_weights_equal(clean, rebuilt)
    assert rebuilt.model.config.rope_theta == clean.model.config.rope_theta
    assert loading.verify_entry_for(str(gguf_path), cache_dir=cache) is None


def test_models_verify_names_damaged_entries_and_repair_removes_them(
    gguf_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("QUICKSILVER_CACHE", str(cache))
    assert main(["models", "--verify"]) == 0
    assert "no converted models are cached" in capsys.readouterr().out
    loading.load(str(gguf_path))
    entry = _entry(cache)
    assert main(["models", "--verify"]) == 0
    out = capsys.readouterr().out
    assert entry.name in out and str(gguf_path) in out and "are whole" in out

    _flip_bytes_inside(entry / "model.safetensors", DAMAGED_TENSOR)
    assert main(["models", "--verify"]) == 1
    captured = capsys.readouterr()
    assert f"damaged: tensor {DAMAGED_TENSOR} hash mismatch" in captured.out
    assert "quicksilver models --verify --repair" in captured.err
    assert entry.exists()  # verifying alone changes nothing

    assert main(["models", "--verify", "--repair"]) == 0
    assert f"removed, damaged: tensor {DAMAGED_TENSOR} hash mismatch" in capsys.readouterr().out
    assert not entry.exists()
    loading.load(str(gguf_path))
    assert main(["models", "--verify"]) == 0


def test_models_verify_lists_outdated_entries_and_repair_frees_them(
    gguf_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An entry an earlier version wrote (no hashes, another key) is never read again: it is
    listed as outdated, is not an error, and --repair removes it."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("QUICKSILVER_CACHE", str(cache))
    loading.load(str(gguf_path))
    current = _entry(cache)
    old = cache / "converted" / "0123456789abcdef"
    old.mkdir()
    (old / "complete").write_text(json.dumps({"source": "old.gguf", "files": {}}))
    capsys.readouterr()
    assert main(["models", "--verify"]) == 0
    captured = capsys.readouterr()
    assert "outdated" in captured.out and "old.gguf" in captured.out
    assert "1 cached conversion(s)" in captured.out and "--repair" in captured.err
    assert main(["models", "--verify", "--repair"]) == 0
    assert "removed 0 damaged and 1 outdated" in capsys.readouterr().out
    assert not old.exists() and current.is_dir()


def test_real_model_entry_verifies(smollm_fp32: loading.LoadedModel) -> None:
    """The shipped SmolLM2 conversion (tokenizer files included) proves itself whole."""
    entry = smollm_fp32.cache_entry
    assert entry is not None and (entry / "tokenizer" / "tokenizer.json").is_file()
    manifest = json.loads((entry / "complete").read_text())
    assert "tokenizer/tokenizer.json" in manifest["sha256"]
    hashed = manifest["weights"]["tensors"]
    # Tied head: the embedding, the final norm and six tensors per block.
    assert len(hashed) == 2 + 6 * smollm_fp32.model.config.n_layers and "embed" in hashed
    assert smollm_fp32.verify_cache() is None
    assert entry.is_dir()


def test_nan_from_a_damaged_entry_names_it_and_removes_it(gguf_path: Path, tmp_path: Path):
    """NaN written inside a cached tensor (no size changes, so a load cannot see it): the
    API's NaN error names the damaged entry and removes it, and the next load rebuilds it."""
    import quicksilver as qs

    cache = tmp_path / "cache"
    loading.load(str(gguf_path), cache_dir=cache)
    entry = _entry(cache)
    start, end = _tensor_range(entry / "model.safetensors", DAMAGED_TENSOR)
    with (entry / "model.safetensors").open("r+b") as f:
        f.seek(start)
        f.write(struct.pack("<f", float("nan")) * ((end - start) // 4))
    llm = qs.LLM(loading.load(str(gguf_path), dtype=torch.float32, cache_dir=cache))
    with pytest.raises(qs.QuicksilverError, match="damaged") as caught:
        llm.generate([5, 6, 7], max_new_tokens=2)
    assert str(entry) in str(caught.value) and not entry.exists()
    rebuilt = qs.LLM(loading.load(str(gguf_path), dtype=torch.float32, cache_dir=cache))
    assert len(rebuilt.generate([5, 6, 7], max_new_tokens=2).completions[0].token_ids) == 2
