"""Bad inputs to ``loading.load`` end in a QuicksilverError that says what is wrong.

The CLI turns QuicksilverError into a one-line message; any other exception type would surface
as a traceback, so each case checks the type strictly as well as the message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny, save_tiny_gguf, tiny_gpt2, tiny_llama

from quicksilver.errors import QuicksilverError
from quicksilver.models import loading


def _load_error(name: str | Path, tmp_path: Path) -> str:
    """Load and return the error message; fail on success or on any other exception type."""
    with pytest.raises(Exception) as info:
        loading.load(str(name), "float32", cache_dir=tmp_path / "cache")
    assert type(info.value) is QuicksilverError, f"{type(info.value).__name__}: {info.value}"
    return str(info.value)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = save_tiny_gguf(tiny_llama(), tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return path.read_bytes()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tiny_gpt2(), tmp_path_factory.mktemp("gpt2") / "model")


def _copy_dir(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


# ----------------------------------------------------------------------------- paths


@pytest.mark.parametrize("name", ["/no/such/model_dir", "missing-model.gguf", "./not-here"])
def test_missing_path(tmp_path: Path, name: str) -> None:
    message = _load_error(name, tmp_path)
    assert "not found" in message and name in message


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    assert "no config.json" in _load_error(tmp_path / "model", tmp_path)


def test_directory_holding_a_gguf_points_at_the_file(tmp_path: Path, tiny_gguf: bytes) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tiny.gguf").write_bytes(tiny_gguf)
    message = _load_error(tmp_path / "model", tmp_path)
    assert "no config.json" in message and "tiny.gguf" in message


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    assert "not a .gguf" in _load_error(path, tmp_path)


def test_unknown_dtype(tmp_path: Path, gpt2_dir: Path) -> None:
    with pytest.raises(QuicksilverError, match="unknown dtype 'float8'"):
        loading.load(str(gpt2_dir), "float8")


# ----------------------------------------------------------------------------- GGUF


def test_gguf_of_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "random.gguf"
    path.write_bytes(os.urandom(4096))
    message = _load_error(path, tmp_path)
    assert "not a readable GGUF file" in message and str(path) in message


def test_empty_gguf(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert "not a readable GGUF file" in _load_error(path, tmp_path)


@pytest.mark.parametrize("cut", [6, 20, 120, 400, 2000, 0.5, -1])
def test_truncated_gguf(tmp_path: Path, tiny_gguf: bytes, cut: float) -> None:
    """Cut inside the magic, the header counts, the metadata, the tensor index and the data.

    Integers are byte offsets (negative: from the end), floats a fraction of the file.
    """
    end = int(len(tiny_gguf) * cut) if isinstance(cut, float) else cut
    path = tmp_path / "truncated.gguf"
    path.write_bytes(tiny_gguf[:end])
    message = _load_error(path, tmp_path)
    assert "not a readable GGUF file" in message and "truncated or corrupt" in message


def test_truncated_real_gguf_header(tmp_path: Path) -> None:
    """The first 64 KiB of the shipped SmolLM2 file: a real header, cut mid-vocabulary."""
    try:
        real = Path(loading.resolve(loading.DEFAULT_MODEL).path)
    except QuicksilverError:
        pytest.skip("the default GGUF model is not installed")
    path = tmp_path / "cut.gguf"
    with real.open("rb") as handle:
        path.write_bytes(handle.read(64 * 1024))
    assert "not a readable GGUF file" in _load_error(path, tmp_path)


def test_gguf_of_another_architecture(tmp_path: Path) -> None:
    path = save_tiny_gguf(tiny_llama(), tmp_path / "other.gguf", architecture="gpt2")
    message = _load_error(path, tmp_path)
    assert "architecture 'gpt2' is not supported" in message


def test_gguf_missing_metadata(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "missing the GGUF metadata field 'llama.attention.head_count'" in _load_error(
        path, tmp_path
    )


def test_gguf_missing_tensors(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "no_tensors.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "missing tensor 'token_embd.weight'" in _load_error(path, tmp_path)


# ----------------------------------------------------------------------------- HF directories


def _write_config(directory: Path, config: object) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_unsupported_model_type(tmp_path: Path) -> None:
    directory = _write_config(tmp_path / "bert", {"model_type": "bert", "vocab_size": 10})
    message = _load_error(directory, tmp_path)
    assert "model_type 'bert' is not supported" in message
    assert "llama" in message and "gpt2" in message and "opt" in message


def test_config_without_model_type(tmp_path: Path) -> None:
    directory = _write_config(tmp_path / "untyped", {"vocab_size": 10})
    assert "config.json has no model_type" in _load_error(directory, tmp_path)


def test_config_missing_a_required_key(tmp_path: Path) -> None:
    directory = _write_config(tmp_path / "partial", {"model_type": "llama", "vocab_size": 10})
    message = _load_error(directory, tmp_path)
    assert "lacks the required key" in message and "hidden_size" in message


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_config_that_is_not_a_json_object(tmp_path: Path, text: str) -> None:
    directory = tmp_path / "bad_json"
    directory.mkdir()
    (directory / "config.json").write_text(text)
    assert "config.json" in _load_error(directory, tmp_path)


def test_unsupported_rope_scaling(tmp_path: Path, gpt2_dir: Path) -> None:
    config = json.loads(tiny_llama().config.to_json_string())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    directory = _write_config(tmp_path / "yarn", config)
    assert "RoPE scaling type 'yarn' is not supported" in _load_error(directory, tmp_path)


def test_unsupported_activation(tmp_path: Path, gpt2_dir: Path) -> None:
    config = json.loads((gpt2_dir / "config.json").read_text())
    config["activation_function"] = "silu"
    directory = _write_config(tmp_path / "silu_gpt2", config)
    assert "activation 'silu' is not supported for GPT-2/OPT" in _load_error(directory, tmp_path)


def test_directory_without_weights(tmp_path: Path, gpt2_dir: Path) -> None:
    directory = tmp_path / "no_weights"
    directory.mkdir()
    (directory / "config.json").write_bytes((gpt2_dir / "config.json").read_bytes())
    assert "has no *.safetensors or pytorch_model*.bin" in _load_error(directory, tmp_path)


def test_corrupt_safetensors(tmp_path: Path, gpt2_dir: Path) -> None:
    directory = _copy_dir(gpt2_dir, tmp_path / "corrupt")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "cannot read weights from" in _load_error(directory, tmp_path)


def test_corrupt_pickle(tmp_path: Path, gpt2_dir: Path) -> None:
    directory = tmp_path / "corrupt_bin"
    directory.mkdir()
    (directory / "config.json").write_bytes((gpt2_dir / "config.json").read_bytes())
    (directory / "pytorch_model.bin").write_bytes(os.urandom(256))
    assert "cannot read weights from" in _load_error(directory, tmp_path)


def test_weights_that_do_not_fit_the_config(tmp_path: Path, gpt2_dir: Path) -> None:
    directory = _copy_dir(gpt2_dir, tmp_path / "mismatch")
    config = json.loads((directory / "config.json").read_text())
    config["n_embd"] = 32
    (directory / "config.json").write_text(json.dumps(config))
    message = _load_error(directory, tmp_path)
    assert "has shape" in message and "do not belong together" in message


def test_checkpoint_missing_a_tensor(tmp_path: Path, gpt2_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    directory = _copy_dir(gpt2_dir, tmp_path / "missing_tensor")
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, str(directory / "model.safetensors"))
    assert "missing tensor 'h.1.mlp.c_fc.weight'" in _load_error(directory, tmp_path)


def test_broken_tokenizer_is_an_error(tmp_path: Path, gpt2_dir: Path) -> None:
    """No tokenizer is fine (None); a tokenizer file that cannot be read is reported."""
    directory = _copy_dir(gpt2_dir, tmp_path / "bad_tokenizer")
    (directory / "tokenizer.json").write_text("{ broken")
    assert "cannot load a tokenizer" in _load_error(directory, tmp_path)
