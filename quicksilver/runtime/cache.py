"""A preallocated KV cache for a batch of left-padded sequences.

Rows of different prompt lengths are left-padded so that every row writes the same slot at
each step (one slice assignment per layer, no per-row bookkeeping in the hot loop).
``start[b]`` is row b's first real slot; slots before it are never attended to.
"""

from __future__ import annotations

import torch

from quicksilver.errors import QuicksilverError
from quicksilver.models.config import ModelConfig


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.start = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0  # slots in use, the same for every row
        self.padded = False  # True once any row starts after slot 0
        self.max_len = max_len
        self.sliding_window = config.sliding_window
        # Per-layer, per-slot state that only adaptive policies use, allocated on first use:
        # whether an entry may be attended to (a skipped or merged-away token's may not) and
        # the log of the number of tokens a (fused) entry stands for.
        self.visible: torch.Tensor | None = None  # bool [L, B, T]
        self.log_size: torch.Tensor | None = None  # float32 [L, B, T]
        self.adapted = False  # True once any entry is hidden or stands for several tokens
        # First slot holding a generated (not prompt) token, when the caller knows it: the
        # generation step of a token is its slot minus this (SkipDecode's schedule).
        self.prompt_end: int | None = None

    def visibility(self) -> torch.Tensor:
        if self.visible is None:
            self.visible = torch.ones(
                self.k.shape[:2] + (self.max_len,), dtype=torch.bool, device=self.k.device
            )
        return self.visible

    def log_sizes(self) -> torch.Tensor:
        if self.log_size is None:
            self.log_size = torch.zeros(self.k.shape[:2] + (self.max_len,), device=self.k.device)
        return self.log_size

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reserve(self, n: int) -> int:
        """Claim the next ``n`` slots for every row; returns the first one."""
        if self.length + n > self.max_len:
            raise QuicksilverError(
                f"KV cache is full: {self.length} + {n} tokens exceed its {self.max_len} slots; "
                "use a shorter prompt or fewer new tokens"
            )
        first = self.length
        self.length += n
        return first

    def attention_mask(self, slots: torch.Tensor, attend_len: int) -> torch.Tensor:
        """[B, 1, S, attend_len] bool: query at slot q may read slot j iff start <= j <= q.

        Padding queries (before their row's start, or slot -1 entries of a gathered block)
        read one slot only, so their outputs, which nobody uses, stay finite instead of NaN
        from an empty softmax.
        """
        keys = torch.arange(attend_len, device=slots.device)
        q = slots.unsqueeze(-1)
        allowed = (keys <= q) & (keys >= self.start.view(-1, 1, 1))
        if self.sliding_window:
            allowed &= keys > q - self.sliding_window
        allowed |= keys == q.clamp(min=0)
        return allowed.unsqueeze(1)
