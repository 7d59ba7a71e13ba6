"""Bad inputs to ``loading.load`` end in a QuicksilverError that says what is wrong.

The CLI turns QuicksilverError into a one-line message; any other exception type would surface
as a traceback, so each case checks the type strictly as well as the message.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_MODELS, save_tiny, save_tiny_gguf, tiny_gpt2, tiny_llama

from quicksilver.errors import QuicksilverError
from quicksilver.models import hf, loading
from quicksilver.models.transformer import Transformer


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


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    "spec, dtype",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
    ],
)
def test_accepted_dtypes(spec: str | torch.dtype, dtype: torch.dtype) -> None:
    assert loading.parse_dtype(spec) is dtype


@pytest.mark.parametrize(
    "spec, message",
    [
        ("FP32", "unknown dtype 'FP32'; choose float32, bfloat16 or float16"),
        ("torch.float32", "unknown dtype"),
        ("", "unknown dtype"),
        (torch.float64, "dtype torch.float64 is not supported"),
        (torch.int8, "dtype torch.int8 is not supported"),
        (None, "got NoneType"),
        (32, "got int"),
        (["float32"], "got list"),
    ],
)
def test_rejected_dtypes(spec: object, message: str) -> None:
    with pytest.raises(QuicksilverError) as info:
        loading.parse_dtype(spec)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_load_takes_a_torch_dtype(gpt2_dir: Path) -> None:
    lm = loading.load(gpt2_dir, torch.float16)  # a Path and a torch.dtype, as the API passes
    assert lm.model.dtype is torch.float16
    with pytest.raises(QuicksilverError, match="not supported"):
        loading.load(str(gpt2_dir), torch.float64)


@pytest.mark.parametrize("name", [None, 3, "", "   ", "a\0b"])
def test_model_names_that_are_not_names(name: object) -> None:
    with pytest.raises(QuicksilverError, match="model"):
        loading.load(name)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- config sizes


@pytest.mark.parametrize("key", ["vocab_size", "n_embd", "n_layer", "n_positions", "n_inner"])
@pytest.mark.parametrize("value", [0, -4, 64.0, 1.5, True, "64"])
def test_config_sizes_must_be_positive_integers(
    tmp_path: Path, gpt2_dir: Path, key: str, value: object
) -> None:
    config = json.loads((gpt2_dir / "config.json").read_text())
    config[key] = value
    directory = _write_config(tmp_path / "bad_size", config)
    message = _load_error(directory, tmp_path)
    assert "positive integers" in message or "invalid value" in message, message


@pytest.mark.parametrize(
    "key, value",
    [
        ("vocab_size", 10**12),
        ("hidden_size", 2**40),
        ("num_hidden_layers", 10**9),
        ("intermediate_size", 10**13),
    ],
)
def test_absurd_sizes_are_refused_before_allocating(tmp_path: Path, key: str, value: int) -> None:
    config = json.loads(tiny_llama().config.to_json_string())
    config[key] = value
    if key == "hidden_size":
        config["head_dim"] = 16
    directory = _write_config(tmp_path / "huge", config)
    message = _load_error(directory, tmp_path)
    assert "would need" in message and "GiB of memory" in message
    assert f"{key.replace('num_hidden_layers', 'n_layers')}={value}" in message


def test_gpt2_positions_count_towards_memory(tmp_path: Path, gpt2_dir: Path) -> None:
    config = json.loads((gpt2_dir / "config.json").read_text())
    config["n_positions"] = 10**12
    message = _load_error(_write_config(tmp_path / "positions", config), tmp_path)
    assert "max_position_embeddings=1000000000000" in message


def test_memory_limit_is_this_machines(gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    total = loading.total_memory_bytes()
    assert total is not None and total > 2**26  # /proc/meminfo or sysconf answered
    need = loading.ModelConfig.from_hf(json.loads((gpt2_dir / "config.json").read_text()))
    weights = need.parameter_count() * 4
    monkeypatch.setattr(loading, "total_memory_bytes", lambda: int(weights / 0.9) - 1)
    with pytest.raises(QuicksilverError, match="more than 90% of this machine's"):
        loading.load(str(gpt2_dir))
    monkeypatch.setattr(loading, "total_memory_bytes", lambda: int(weights / 0.9) + 8)
    assert loading.load(str(gpt2_dir)).model is not None
    monkeypatch.setattr(loading, "total_memory_bytes", lambda: None)  # unknown: no check
    assert loading.load(str(gpt2_dir)).model is not None


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_parameter_count_is_exact(family: str) -> None:
    """The estimate matches the parameters our transformer really has, for every family."""
    config = loading.ModelConfig.from_hf(TINY_MODELS[family]().config.to_dict())
    with torch.device("meta"):
        model = Transformer(config)
    real = sum(p.numel() for name, p in model.named_parameters())
    if config.tie_word_embeddings:
        real -= model.lm_head.weight.numel()
    assert config.parameter_count() == real


# ----------------------------------------------------------------------------- GGUF cache


def _entry(cache: Path) -> Path:
    entries = [p for p in (cache / "converted").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1, entries
    return entries[0]


def _damage_safetensors_header(entry: Path) -> None:
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:24] = b"}garbled{garbled"
    weights.write_bytes(bytes(data))


def _truncate_weights(entry: Path) -> None:
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def _garble_config(entry: Path) -> None:
    (entry / "config.json").write_text('{"family": "llama", "vocab_size"')


def _wrong_config(entry: Path) -> None:
    """Valid JSON of the same length whose sizes do not fit the weights."""
    text = (entry / "config.json").read_text()
    (entry / "config.json").write_text(text.replace('"n_layers": 3', '"n_layers": 2'))


DAMAGE = {
    "garbled header": _damage_safetensors_header,
    "truncated weights": _truncate_weights,
    "missing weights": lambda entry: (entry / "model.safetensors").unlink(),
    "missing config": lambda entry: (entry / "config.json").unlink(),
    "bad config json": _garble_config,
    "config of another model": _wrong_config,
    "missing manifest": lambda entry: (entry / "complete").unlink(),
    "bad manifest": lambda entry: (entry / "complete").write_text("not json"),
    "entry is a file": lambda entry: (shutil.rmtree(entry), entry.write_text("x")),
}


@pytest.fixture
def tiny_gguf_path(tmp_path: Path, tiny_gguf: bytes) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny_gguf)
    return path


def test_cache_is_used_on_the_second_load(
    tiny_gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    first = loading.load(str(tiny_gguf_path), cache_dir=cache)
    manifest = json.loads((_entry(cache) / "complete").read_text())
    assert (
        manifest["files"]["model.safetensors"]
        == (_entry(cache) / "model.safetensors").stat().st_size
    )

    def no_conversion(path: Path) -> None:
        raise AssertionError("the cached entry should have been used")

    monkeypatch.setattr(loading, "_read_gguf", no_conversion)
    second = loading.load(str(tiny_gguf_path), cache_dir=cache)
    assert torch.equal(first.model.embed, second.model.embed)


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_cache_entry_is_rebuilt(
    tiny_gguf_path: Path, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    reference = loading.load(str(tiny_gguf_path), cache_dir=cache)
    entry = _entry(cache)
    DAMAGE[damage](entry)
    capsys.readouterr()
    rebuilt = loading.load(str(tiny_gguf_path), cache_dir=cache)
    err = capsys.readouterr().err
    assert f"warning: the converted-model cache entry {entry} is damaged" in err
    assert f"rebuilding it from {tiny_gguf_path}" in err
    assert torch.equal(rebuilt.model.embed, reference.model.embed)
    # The rebuilt entry is whole again: the next load is quiet.
    loading.load(str(tiny_gguf_path), cache_dir=cache)
    assert capsys.readouterr().err == ""
    assert _entry(cache) == entry


def test_interrupted_conversion_leaves_no_entry(
    tiny_gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    save_config = loading.ModelConfig.to_dict

    def interrupted(self: loading.ModelConfig) -> dict:
        raise KeyboardInterrupt  # Ctrl-C after the weights were written

    monkeypatch.setattr(loading.ModelConfig, "to_dict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loading.load(str(tiny_gguf_path), cache_dir=cache)
    assert list((cache / "converted").iterdir()) == []  # neither an entry nor a temp dir
    monkeypatch.setattr(loading.ModelConfig, "to_dict", save_config)
    loading.load(str(tiny_gguf_path), cache_dir=cache)
    assert (_entry(cache) / "complete").is_file()


def test_read_only_cache_still_loads(
    tiny_gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only(*args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(loading.tempfile, "mkdtemp", read_only)
    lm = loading.load(str(tiny_gguf_path), cache_dir=tmp_path / "cache")
    assert lm.model.config.n_layers == 3


# ----------------------------------------------------------------------------- hub cache

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub_cache(root: Path, repo: str, files: bool = True) -> Path:
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<rev>/...}."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / REVISION
    if files:
        save_tiny(tiny_gpt2(), snapshot, with_tokenizer=True)
    else:
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(json.dumps(tiny_gpt2().config.to_dict()))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every hub call the loader could make fails loudly and is recorded."""
    import huggingface_hub

    calls: list[str] = []

    def offline(name: str):
        def call(*args: object, **kwargs: object) -> None:
            calls.append(name)
            raise ConnectionError(f"{name}: network is unreachable")

        return call

    for name in ("list_repo_files", "snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, offline(name))
    # The reachability probe passes, so the hub calls themselves are what fails.
    monkeypatch.setattr(hf, "_hub_unreachable", lambda endpoint, offline: None)
    return calls


def test_an_unreachable_hub_fails_at_once_without_hub_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    """No network: one probe, then the error (huggingface_hub would retry for ~25 s)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hf, "_hub_unreachable", lambda endpoint, offline: "no route to host")
    message = _load_error("nobody/nothing", tmp_path)
    assert "the hub cannot be reached (no route to host)" in message
    assert no_network == []


def test_the_hub_probe_reports_offline_mode_and_a_closed_port() -> None:
    assert hf._hub_unreachable("https://huggingface.co", offline=True) == "HF_HUB_OFFLINE is set"
    with socket.socket() as listener:  # a port bound but never listening refuses at once
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        start = time.perf_counter()
        reason = hf._hub_unreachable(f"http://127.0.0.1:{port}", offline=False, timeout=2.0)
    assert reason is not None and reason.startswith("127.0.0.1")
    assert time.perf_counter() - start < 2.5


def test_hub_id_in_the_local_cache_loads_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    snapshot = _fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-gpt2")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # "tiny-org/tiny-gpt2" must not exist as a local path
    lm = loading.load("tiny-org/tiny-gpt2")
    assert no_network == []
    assert lm.source.kind == "hub" and lm.model.config.family == "gpt2"
    assert lm.tokenizer is not None
    direct = loading.load(str(snapshot))
    assert torch.equal(lm.model.embed, direct.model.embed)


def test_hub_id_neither_cached_nor_reachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    message = _load_error("nobody/nothing", tmp_path)
    assert "'nobody/nothing' is not in the local Hugging Face cache" in message
    assert str(tmp_path / "hub") in message and "could not be fetched" in message
    assert no_network == ["list_repo_files"]


def test_partial_snapshot_goes_to_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    """A snapshot with config.json but no weights is not a model: the hub must complete it."""
    _fake_hub_cache(tmp_path / "hub", "tiny-org/partial", files=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert "not in the local Hugging Face cache" in _load_error("tiny-org/partial", tmp_path)
    assert no_network == ["list_repo_files"]


def test_invalid_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert "not a valid Hugging Face hub id" in _load_error("bad id!/x", tmp_path)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rope_theta": 0}, "rope_theta must be a finite number > 0"),
        ({"rope_theta": 10**400}, "invalid value"),
        ({"rms_norm_eps": -1e-5}, "norm epsilon must be a finite number >= 0"),
        ({"rms_norm_eps": "tiny"}, "norm epsilon"),
        (
            {
                "hidden_size": 60,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "head_dim": None,
            },
            "even head",
        ),
        (
            {
                "hidden_size": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "head_dim": None,
            },
            "no dimensions",
        ),
        ({"head_dim": 0}, "positive integers"),
        ({"num_key_value_heads": 0}, "positive integers"),
        ({"rope_scaling": {"rope_type": "linear", "factor": "x"}}, "rope_scaling.factor"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 10**400}}, None),
        ({"rope_scaling": {"rope_type": "linear", "factor": -2.0}}, "rope_scaling.factor"),
        ({"rope_scaling": [1, 2]}, "invalid value"),
        (
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 4.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                }
            },
            "high_freq_factor must exceed low_freq_factor",
        ),
    ],
)
def test_config_values_that_cannot_build_a_model(
    tmp_path: Path, changes: dict, message: str | None
) -> None:
    config = json.loads(tiny_llama().config.to_json_string())
    config.pop("rope_parameters", None)  # so rope_theta / rope_scaling below are the ones read
    config.update(changes)
    error = _load_error(_write_config(tmp_path / "bad", config), tmp_path)
    assert message is None or message in error, error


# ----------------------------------------------------------------------------- GGUF types, shapes

HIDDEN, HEADS, FFN, VOCAB = 8, 2, 16, 10


def _tiny_gguf_tensors() -> dict[str, tuple[int, ...]]:
    """Every tensor of a one-layer Llama GGUF, in torch's [out, in] order."""
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (VOCAB, HIDDEN),
        "output_norm.weight": (HIDDEN,),
    }
    for name, shape in {
        "attn_norm": (HIDDEN,),
        "ffn_norm": (HIDDEN,),
        "attn_q": (HIDDEN, HIDDEN),
        "attn_k": (HIDDEN, HIDDEN),
        "attn_v": (HIDDEN, HIDDEN),
        "attn_output": (HIDDEN, HIDDEN),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
    }.items():
        shapes[f"blk.0.{name}.weight"] = shape
    return shapes


def _write_gguf(
    path: Path,
    metadata: dict[str, object] | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> Path:
    """A small Llama GGUF whose metadata values (a value, or (value, GGUF type) to force a
    type) and tensor shapes the test chooses; the defaults make a loadable model."""
    import gguf
    import numpy as np

    values: dict[str, object] = {
        "llama.block_count": 1,
        "llama.embedding_length": HIDDEN,
        "llama.feed_forward_length": FFN,
        "llama.attention.head_count": HEADS,
        "llama.context_length": 32,
    }
    values.update(metadata or {})
    writer = gguf.GGUFWriter(str(path), "llama")
    uint32 = gguf.GGUFValueType.UINT32
    for key, value in values.items():
        if isinstance(value, tuple):
            writer.add_key_value(key, value[0], value[1])
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, uint32)
    rng = np.random.default_rng(0)
    for name, shape in (shapes or _tiny_gguf_tensors()).items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_hand_written_gguf_loads(tmp_path: Path) -> None:
    """The cases below change one thing each in a file that otherwise loads."""
    lm = loading.load(str(_write_gguf(tmp_path / "ok.gguf")), cache_dir=tmp_path / "cache")
    assert lm.model.config.hidden_size == HIDDEN and lm.model.config.n_layers == 1


@pytest.mark.parametrize(
    "key, value, expected, found",
    [
        ("llama.block_count", "three", "an integer", "STRING 'three'"),
        ("llama.embedding_length", [8, 8], "an integer", "ARRAY/INT32 [8, 8]"),
        ("llama.attention.head_count", True, "an integer", "BOOL True"),
        ("llama.context_length", 32.0, "an integer", "FLOAT32 32.0"),
        ("llama.rope.freq_base", "fast", "a number", "STRING 'fast'"),
        ("llama.attention.layer_norm_rms_epsilon", [1e-5], "a number", "ARRAY/FLOAT32"),
        ("tokenizer.ggml.eos_token_id", "</s>", "an integer", "STRING '</s>'"),
        ("general.name", 7, "a string", "UINT32 7"),
        ("llama.rope.scaling.type", 1, "a string", "UINT32 1"),
    ],
)
def test_gguf_metadata_of_the_wrong_type(
    tmp_path: Path, key: str, value: object, expected: str, found: str
) -> None:
    import gguf

    types = {str: "STRING", bool: "BOOL", float: "FLOAT32", int: "UINT32"}
    forced = value if isinstance(value, list) else (value, gguf.GGUFValueType[types[type(value)]])
    path = _write_gguf(tmp_path / "typed.gguf", {key: forced})
    message = _load_error(path, tmp_path)
    assert message.startswith(f"{path}: GGUF metadata field {key!r} should be {expected}"), message
    assert found in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    "tensor, shape, implied",
    [
        ("blk.0.attn_k.weight", (6, HIDDEN), (HIDDEN, HIDDEN)),
        ("blk.0.ffn_down.weight", (FFN, HIDDEN), (HIDDEN, FFN)),
        ("blk.0.ffn_norm.weight", (HIDDEN + 1,), (HIDDEN,)),
        ("token_embd.weight", (VOCAB, HIDDEN + 2), (VOCAB, HIDDEN)),
    ],
)
def test_gguf_tensor_of_an_unexpected_shape(
    tmp_path: Path, tensor: str, shape: tuple[int, ...], implied: tuple[int, ...]
) -> None:
    shapes = _tiny_gguf_tensors() | {tensor: shape}
    path = _write_gguf(tmp_path / "shapes.gguf", shapes=shapes)
    message = _load_error(path, tmp_path)
    assert message.startswith(f"{path}: GGUF tensor {tensor!r} has shape {shape}"), message
    assert f"implies {implied}" in message and "embedding_length=8" in message, message


def test_gguf_missing_a_block_tensor(tmp_path: Path) -> None:
    shapes = _tiny_gguf_tensors()
    del shapes["blk.0.ffn_up.weight"]
    path = _write_gguf(tmp_path / "no_up.gguf", shapes=shapes)
    assert f"{path} is missing tensor 'blk.0.ffn_up.weight'" in _load_error(path, tmp_path)
