"""Hugging Face checkpoints: local model directories and hub snapshots (found in the local
cache first, so a cached hub id loads without the network), their weights renamed into our
layout, and their tokenizers."""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import torch

from quicksilver.errors import QuicksilverError
from quicksilver.models.config import ModelConfig


def download(repo_id: str) -> Path:
    """A local snapshot of ``repo_id``: from the Hugging Face cache when it holds the config
    and weights (no network at all), else downloaded from the hub."""
    from huggingface_hub import constants

    cache_dir = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    cached = _cached_snapshot(repo_id, cache_dir)
    if cached is not None:
        return cached
    unreachable = _hub_unreachable(constants.ENDPOINT, bool(constants.HF_HUB_OFFLINE))
    if unreachable is not None:
        raise QuicksilverError(
            f"{repo_id!r} is not in the local Hugging Face cache ({cache_dir}) and the hub "
            f"cannot be reached ({unreachable}); download it once with network access, or pass "
            "a local model directory or a .gguf file instead"
        )
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


def _hub_unreachable(endpoint: str, offline: bool, timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (None: it answers a TCP connection). Checked once before
    any hub call: without it huggingface_hub retries a dead network with back-off for ~25 s
    before the same failure."""
    if offline:
        return "HF_HUB_OFFLINE is set"
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError as err:
        return f"{url.hostname}: {err.strerror or err}"
    return None


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


def read_config(directory: Path) -> tuple[dict[str, Any], ModelConfig]:
    """The directory's config.json as read and as our config. Nothing else is read yet, so
    the caller can check the sizes against memory before the weights are."""
    try:
        hf_config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise QuicksilverError(f"cannot read {directory / 'config.json'}: {err}") from err
    if not isinstance(hf_config, dict):
        raise QuicksilverError(f"{directory / 'config.json'} does not hold a JSON object")
    return hf_config, ModelConfig.from_hf(hf_config)


def read_state(
    directory: Path, hf_config: dict[str, Any], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """The directory's weights in fp32 under our names (see ``read_config`` for the config)."""
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
    return convert(config, tensors)


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


def load_hf_tokenizer(directory: Path) -> Any:
    """The directory's tokenizer, or None when it ships no vocabulary."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    return load_tokenizer(directory)


def load_tokenizer(directory: Path, gguf_file: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
    except Exception as err:  # transformers raises many types for a broken tokenizer
        raise QuicksilverError(f"cannot load a tokenizer from {directory}: {err}") from err
