"""The tensors a model is built from: a safetensors file streamed one tensor at a time, and
the check that a state dict fits the layout a config implies (before any memory is spent)."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from quicksilver.errors import QuicksilverError
from quicksilver.models.transformer import Transformer

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

    @property
    def header_bytes(self) -> int:
        """Bytes before the first tensor: the length field and the JSON header."""
        return self._base

    def byte_ranges(self) -> dict[str, tuple[int, int]]:
        """Each tensor's [start, end) in the file, so that its bytes can be hashed as stored."""
        return {
            name: (self._base + entry["data_offsets"][0], self._base + entry["data_offsets"][1])
            for name, entry in self._entries.items()
        }

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


def tensor_shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
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
        if tensor_shape(state, key) != shape:
            raise QuicksilverError(
                f"tensor {key!r} has shape {tensor_shape(state, key)} but the config implies "
                f"{shape}; config.json and the weights do not belong together"
            )
    return tied
