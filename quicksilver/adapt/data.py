"""Training text: plain documents cut into fixed-length token windows, with a held-out slice.

Self-distillation needs no labels, only text like what the model will read; the default is
the C4 validation sample (``eval.datasets``: "c4"), never WikiText's test split, which is
where results are reported. The last documents are held out for validation before anything
is cut, so no window straddles the two parts. Batches follow a permutation drawn from the
seed per pass over the data, so a step's batch depends only on (seed, step): a run resumed
from a checkpoint sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quicksilver.errors import QuicksilverError
from quicksilver.eval import datasets
from quicksilver.text import encode_stream

# Documents held out for validation, as a fraction of the file (at least one document).
VALIDATION_SHARE = 0.05


def default_data_file() -> Path:
    """The C4 validation sample where the project's shared data lives."""
    return datasets.default_data_dir() / datasets.DATASETS["c4"].local["validation"][-1]


def read_documents(path: str | Path) -> list[str]:
    """The documents of a JSONL(.gz) file (field ``text``) or the paragraphs of a text file."""
    name = str(path)
    if name.endswith((".jsonl", ".jsonl.gz")):
        documents = datasets.read_jsonl_documents(path, "text")
    else:
        text = datasets.load_text_file(path).text
        documents = text.split("\n\n")
    documents = [d for d in documents if d.strip()]
    if len(documents) < 2:
        raise QuicksilverError(f"{path} needs at least 2 documents (one is held out)")
    return documents


@dataclass
class TokenWindows:
    """Non-overlapping windows [N, seq_len] of the training and validation token streams."""

    train: torch.Tensor
    validation: torch.Tensor

    def batch(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """The [batch_size, seq_len] windows of training step ``step`` (0-based)."""
        n = len(self.train)
        first = step * batch_size
        rows = []
        for position in range(first, first + batch_size):
            epoch, offset = divmod(position, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            rows.append(int(order[offset]))
        return self.train[rows]


def token_windows(tokenizer: Any, documents: list[str], seq_len: int) -> TokenWindows:
    """Documents joined by blank lines, tokenised as one stream per part, and cut."""
    if tokenizer is None:
        raise QuicksilverError("the model ships no tokenizer; it cannot read training text")
    held_out = max(1, round(len(documents) * VALIDATION_SHARE))
    parts = documents[:-held_out], documents[-held_out:]
    windows = []
    for part in parts:
        ids = torch.tensor(encode_stream(tokenizer, "\n\n".join(part)), dtype=torch.long)
        count = len(ids) // seq_len
        windows.append(ids[: count * seq_len].view(count, seq_len))
    if len(windows[0]) == 0 or len(windows[1]) == 0:
        raise QuicksilverError(
            f"the text is too short for windows of {seq_len} tokens in both its training and "
            "validation parts; use more text or a shorter --seq-len"
        )
    return TokenWindows(*windows)
