"""A preallocated KV cache for a batch of rows, with per-row lengths and rollback.

Rows of different prompt lengths are left-padded so that, while every row has the same
length, every row writes the same slot at each step (one slice assignment per layer, no
per-row bookkeeping in the hot loop). ``start[b]`` is row b's first real slot; slots before
it are never read. Rows may also diverge: ``truncate`` rolls back the last slots of any
subset of rows (rejected draft tokens), after which each row writes at its own next slot.

The cache owns everything that outlives one forward: the K/V entries, each row's length,
where its prompt ended (SkipDecode's schedule counts generated positions from there) and the
per-slot state adaptive policies leave behind — whether an entry may be read (a skipped or
merged-away token's may not) and how many tokens it stands for. ``readable`` is the one rule
for which entries a query may attend to; ``truncate`` restores all of this state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quicksilver.accounting import available_memory_bytes, kv_cache_bytes
from quicksilver.errors import QuicksilverError
from quicksilver.models.config import ModelConfig

GIB = 2**30


def check_cache_fits(
    config: ModelConfig,
    dtype: torch.dtype,
    *,
    rows: int,
    length: int,
    fix: str,
    extra_bytes: int = 0,
) -> None:
    """Refuse a KV cache (plus ``extra_bytes``, e.g. logits) that cannot exist: longer than
    the model's positions, or larger than the memory available now. ``fix`` says what to
    change. Checked before anything is allocated."""
    limit = config.max_position_embeddings
    if length > limit:
        raise QuicksilverError(
            f"the run needs {length} positions per sequence, more than the model's {limit}; {fix}"
        )
    need = kv_cache_bytes(config, rows, length, dtype.itemsize) + extra_bytes
    available = available_memory_bytes()
    if available is not None and need > available:
        what = "KV cache and logits" if extra_bytes else "KV cache"
        raise QuicksilverError(
            f"the run needs at least {need / GIB:.1f} GiB for its {what} "
            f"({rows} sequences x {length} positions), more than the {available / GIB:.1f} GiB "
            f"of memory available; {fix}"
        )


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
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.sliding_window = config.sliding_window
        # The length every row shares (None once rows diverge): the fast contiguous path.
        self._shared_length: int | None = 0
        # First slot of each row holding a generated (not prompt) token, once known.
        self.prompt_end: torch.Tensor | None = None
        # Per-layer, per-slot policy state, allocated on first use: may the entry be read,
        # and the log of the number of tokens a (fused) entry stands for.
        self.visible: torch.Tensor | None = None  # bool [L, B, T]
        self.log_size: torch.Tensor | None = None  # float32 [L, B, T]
        self._adapted = False
        self._padded = False

    # ------------------------------------------------------------------ shape and placement

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def shared_length(self) -> int | None:
        """The number of slots every row uses, or None when rows differ (after a rollback)."""
        return self._shared_length

    @property
    def padded(self) -> bool:
        """True when some row starts after slot 0 (left padding)."""
        return self._padded

    @property
    def adapted(self) -> bool:
        """True while some entry is hidden or stands for several tokens: such a cache cannot
        be read by the plain dense attention."""
        return self._adapted

    def left_pad(self, lengths: Sequence[int]) -> int:
        """Place rows of these prompt lengths right-aligned in a fresh cache; returns the
        block width (the longest prompt)."""
        longest = max(lengths)
        self.start = torch.tensor([longest - n for n in lengths], dtype=torch.long)
        self._padded = any(n != longest for n in lengths)
        return longest

    def set_prompt_end(self, ends: int | Sequence[int] | None = None) -> None:
        """Where each row's prompt ends (one slot for all rows or one per row; None: what is
        written so far is prompt). Slots from there on hold generated tokens."""
        if ends is None:
            self.prompt_end = self.lengths.clone()
        else:
            self.prompt_end = (
                torch.as_tensor(ends, dtype=torch.long).expand(self.batch_size).clone()
            )

    def reserve(self, n: int) -> tuple[torch.Tensor, int | None]:
        """Claim each row's next ``n`` slots: ([B, n] slots, the first slot if shared by
        every row, else None)."""
        longest = int(self.lengths.max()) if self._shared_length is None else self._shared_length
        if longest + n > self.max_len:
            raise QuicksilverError(
                f"KV cache is full: {longest} + {n} tokens exceed its {self.max_len} slots; "
                "use a shorter prompt or fewer new tokens"
            )
        first = self._shared_length
        if first is not None:
            slots = torch.arange(first, first + n).expand(self.batch_size, n)
            self._shared_length = first + n
        else:
            slots = self.lengths.unsqueeze(1) + torch.arange(n)
        self.lengths += n
        return slots, first

    # ------------------------------------------------------------------ the visibility rule

    def readable(
        self,
        rows: torch.Tensor,
        q_slots: torch.Tensor,
        keys: torch.Tensor,
        layer: int | None = None,
    ) -> torch.Tensor:
        """May the query of row ``rows[i]`` at slot ``q_slots[i]`` read slot ``keys[..]``?
        [N, K] bool. Yes iff start <= key <= query slot, the key is inside the sliding window
        and, when ``layer`` is given, the entry is visible in that layer."""
        q = q_slots.unsqueeze(-1)
        allowed = (keys <= q) & (keys >= self.start[rows].unsqueeze(-1))
        if self.sliding_window:
            allowed &= keys > q - self.sliding_window
        if layer is not None and self.visible is not None:
            key_index = keys if keys.dim() == 2 else keys.expand(len(rows), -1)
            allowed &= self.visible[layer, rows.unsqueeze(-1), key_index]
        return allowed

    # ------------------------------------------------------------------ policy state

    def hide(self, layer: int, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Entries that later queries must not read (skipped or merged-away tokens)."""
        if self.visible is None:
            self.visible = torch.ones(
                self.k.shape[:2] + (self.max_len,), dtype=torch.bool, device=self.k.device
            )
        self.visible[layer, rows, slots] = False
        self._adapted = True

    def set_log_sizes(
        self, layer: int, rows: torch.Tensor, slots: torch.Tensor, log_sizes: torch.Tensor
    ) -> torch.Tensor:
        """Record how many tokens each entry stands for; returns the layer's [B, T] table."""
        if self.log_size is None:
            self.log_size = torch.zeros(self.k.shape[:2] + (self.max_len,), device=self.k.device)
        self.log_size[layer, rows, slots] = log_sizes
        if bool((log_sizes != 0).any()):
            self._adapted = True
        return self.log_size[layer]

    # ------------------------------------------------------------------ rollback

    @torch.inference_mode()
    def truncate(
        self, n: int | Sequence[int] | torch.Tensor, rows: Sequence[int] | None = None
    ) -> None:
        """Forget the last ``n`` slots of each of ``rows`` (all rows by default; ``n`` one
        count for all or one per row). The cache is left exactly as if those tokens had never
        been written: K/V zeroed, entries visible and of size 1, lengths and the prompt
        boundary moved back."""
        index = (
            torch.arange(self.batch_size)
            if rows is None
            else torch.as_tensor(list(rows), dtype=torch.long)
        )
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.batch_size):
            raise QuicksilverError(f"rows to roll back must be in 0..{self.batch_size - 1}")
        if len(set(index.tolist())) != len(index):
            raise QuicksilverError("each row may be named once when rolling back")
        counts = torch.as_tensor(n, dtype=torch.long).expand(len(index)).clone()
        filled = self.lengths[index] - self.start[index]
        if bool((counts < 0).any()) or bool((counts > filled).any()):
            raise QuicksilverError(
                f"cannot roll back {counts.tolist()} slots of rows {index.tolist()} holding "
                f"{filled.tolist()} tokens"
            )
        for row, count in zip(index.tolist(), counts.tolist(), strict=True):
            end = int(self.lengths[row])
            begin = end - count
            self.k[:, row, :, begin:end] = 0
            self.v[:, row, :, begin:end] = 0
            if self.visible is not None:
                self.visible[:, row, begin:end] = True
            if self.log_size is not None:
                self.log_size[:, row, begin:end] = 0
            self.lengths[row] = begin
        if self.prompt_end is not None:
            self.prompt_end = torch.minimum(self.prompt_end, self.lengths)
        same = bool((self.lengths == self.lengths[0]).all())
        self._shared_length = int(self.lengths[0]) if same else None
        self._adapted = (self.visible is not None and not bool(self.visible.all())) or (
            self.log_size is not None and bool((self.log_size != 0).any())
        )
