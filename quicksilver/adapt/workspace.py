"""What every adapter run starts from and ends with: the frozen model in float32 (plain
weights: autograd cannot go through oneDNN's pre-packed ones), its hash, the token windows,
and the adapter file written with its record."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from quicksilver.adapt.data import TokenWindows, default_data_file, read_documents, token_windows
from quicksilver.adapt.files import base_model_hash, default_adapter_dir, write_adapter
from quicksilver.adapt.train import TrainingRun, TrainingSettings
from quicksilver.models import loading
from quicksilver.models.transformer import Transformer

# Validation windows scored before and after training (a quick, fixed held-out measure).
VALIDATION_WINDOWS = 8


@dataclass
class Workspace:
    model: Transformer
    name: str
    base_sha256: str
    windows: TokenWindows
    data: str

    def validation_batches(self, batch_size: int) -> list[torch.Tensor]:
        held_out = self.windows.validation[:VALIDATION_WINDOWS]
        return list(held_out.split(batch_size))


@dataclass
class AdapterResult:
    """A written adapter file and its record."""

    path: Path
    record: dict


def open_workspace(
    model: str | os.PathLike[str], data: str | os.PathLike[str] | None, seq_len: int
) -> Workspace:
    """Load ``model`` frozen in float32 and cut ``data`` (default: the C4 sample)."""
    path = Path(data) if data is not None else default_data_file()
    loaded = loading.load(model, "float32", fast=False)
    windows = token_windows(loaded.tokenizer, read_documents(path), seq_len)
    return Workspace(
        loaded.model, loaded.source.name, base_model_hash(loaded.source), windows, str(path)
    )


def write_result(
    workspace: Workspace,
    kind: str,
    tensors: dict[str, torch.Tensor],
    details: dict,
    settings: TrainingSettings,
    run: TrainingRun,
    output: str | os.PathLike[str] | None,
) -> AdapterResult:
    """Write the adapter to ``output`` (default: the adapters cache, named by model, kind
    and the first digits of the base hash) with its full record."""
    record = {
        "kind": kind,
        "base_model": workspace.name,
        "base_model_sha256": workspace.base_sha256,
        **details,
        "settings": dataclasses.asdict(settings),
        "data": workspace.data,
        "steps": len(run.losses),
        "tokens": run.tokens,
        "seconds": round(run.seconds, 3),
        "loss_curve": [round(loss, 6) for loss in run.losses],
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if output is None:
        stem = Path(workspace.name).name.removesuffix(".gguf")
        output = default_adapter_dir() / f"{stem}-{kind}-{workspace.base_sha256[:8]}.safetensors"
    path = write_adapter(output, tensors, record)
    return AdapterResult(path, record)
