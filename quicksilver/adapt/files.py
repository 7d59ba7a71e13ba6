"""Adapter files: one safetensors file holding the trained tensors and, in its metadata, a
JSON record of how they were made (base model hash, kind, schedule or layers, steps, tokens,
seconds, loss curve).

An adapter only means something on the weights it was trained against, so the record keeps
the sha256 of the base model's files and loading refuses any other model with one line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from quicksilver.adapt.exits import ExitHeads
from quicksilver.errors import QuicksilverError
from quicksilver.models import hf
from quicksilver.models.convert_cache import cache_root
from quicksilver.models.loading import ModelSource

RECORD_KEY = "quicksilver.adapter"
KINDS = ("skipdecode", "exits")
# The files of a model directory that decide its weights (tokenizer files do not).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
_CHUNK = 1 << 22


def default_adapter_dir() -> Path:
    """``$QUICKSILVER_CACHE/adapters`` (default ``~/.cache/quicksilver/adapters``)."""
    return cache_root(None) / "adapters"


def base_model_hash(source: ModelSource) -> str:
    """sha256 over the files a model's weights come from: the GGUF file, or a directory's
    config and weight files in name order (a hub id: its downloaded directory)."""
    if source.kind == "gguf":
        files = [Path(source.path)]
    else:
        directory = Path(source.path) if source.kind == "hf_dir" else hf.download(source.path)
        files = sorted(
            p for p in directory.iterdir() if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES
        )
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Adapter:
    """What an adapter file holds: its tensors by name and its record."""

    tensors: dict[str, torch.Tensor]
    record: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.record["kind"]

    def check_base(self, source: ModelSource, path: str | os.PathLike[str]) -> None:
        """Refuse a model other than the one the adapter was trained on."""
        found = base_model_hash(source)
        if found != self.record["base_model_sha256"]:
            raise QuicksilverError(
                f"adapter {path} was trained on {self.record.get('base_model', 'another model')} "
                f"(sha256 {self.record['base_model_sha256'][:12]}...), not on {source.name} "
                f"(sha256 {found[:12]}...); train one for this model with `quicksilver adapt`"
            )

    def weight_merge(self) -> Callable[[str, torch.Tensor], torch.Tensor] | None:
        """For a LoRA adapter: ``(parameter name, weight) -> merged weight``, the update
        added in float32 while the weights stream in (before any quantisation)."""
        if self.kind != "skipdecode":
            return None
        scale = float(self.record["alpha"]) / int(self.record["rank"])
        deltas = {}
        for name in {key.rsplit(".", 1)[0] for key in self.tensors}:
            a, b = self.tensors[f"{name}.lora_a"], self.tensors[f"{name}.lora_b"]
            deltas[f"{name}.weight"] = (b.float() @ a.float()) * scale

        def merge(key: str, weight: torch.Tensor) -> torch.Tensor:
            delta = deltas.get(key)
            return weight if delta is None else weight.float() + delta

        return merge

    def exit_heads(self) -> ExitHeads | None:
        if self.kind != "exits":
            return None
        tensors = self.tensors
        return ExitHeads.from_tensors(tensors["exit_heads.weight"], tensors["exit_heads.bias"])


def write_adapter(path: str | Path, tensors: dict[str, torch.Tensor], record: dict) -> Path:
    """Write tensors and record to ``path`` (atomically: a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(contiguous, str(temporary), metadata={RECORD_KEY: json.dumps(record)})
    os.replace(temporary, path)
    return path


def read_adapter(path: str | os.PathLike[str]) -> Adapter:
    """An adapter file, or a one-line error saying what is wrong with it."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(os.fspath(path))
    except FileNotFoundError:
        raise QuicksilverError(f"adapter file {path} does not exist") from None
    except (OSError, SafetensorError) as err:
        raise QuicksilverError(f"cannot read adapter file {path}: {err}") from None
    try:
        record = json.loads(metadata[RECORD_KEY])
        if record["kind"] not in KINDS or not isinstance(record["base_model_sha256"], str):
            raise ValueError(record.get("kind"))
    except (KeyError, ValueError, TypeError):
        raise QuicksilverError(
            f"{path} is not a quicksilver adapter (no valid record in its metadata)"
        ) from None
    return Adapter(tensors, record)
