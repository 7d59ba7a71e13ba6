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

import math
from collections.abc import Sequence

import numpy as np
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


def sequence_fit_error(prompt_tokens: int, new_tokens: int, room: int, what: str) -> str | None:
    """The one fit rule for a sequence: its prompt and every generated token but the last go
    through the cache, so they need ``prompt + new - 1`` positions out of ``room`` (``what``
    names the room: "the model's 2048", "the 512 this batch holds"). None if it fits."""
    need = prompt_tokens + new_tokens - 1
    if need <= room:
        return None
    return (
        f"the prompt ({prompt_tokens} tokens) and {new_tokens} new tokens need {need} "
        f"positions, more than {what}"
    )


def causal_reads(
    start: torch.Tensor, q_slots: torch.Tensor, keys: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """The visibility rule without policy state, as pure tensor code (the compiled step
    traces it): a query of a row starting at ``start`` at slot ``q_slots`` may read key slots
    ``start <= key <= slot`` that are inside the sliding window. [N, K] bool."""
    q = q_slots.unsqueeze(-1)
    allowed = (keys <= q) & (keys >= start.unsqueeze(-1))
    if sliding_window:
        allowed &= keys > q - sliding_window
    return allowed


def lazy_zeros(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """Zeros whose memory the OS provides only as it is written (on the CPU: numpy's zeros
    come from calloc, i.e. untouched zero pages), so a server's cache for many long rows costs
    what its rows hold, not what they could hold. Readers may read (masked) slots nobody
    wrote; those must be finite, which zeros are."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    n_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    storage = np.zeros(n_bytes + ALIGN, dtype=np.uint8)
    offset = -storage.ctypes.data % ALIGN  # aligned as torch's own allocations are
    return torch.from_numpy(storage[offset : offset + n_bytes]).view(dtype).view(shape)


ALIGN = 64


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
        self.k = lazy_zeros(shape, dtype, device)
        self.v = lazy_zeros(shape, dtype, device)
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
        self._visible: torch.Tensor | None = None  # bool [L, B, T]
        self._log_size: torch.Tensor | None = None  # float32 [L, B, T]
        self._adapted = False
        self._padded = False
        # Attend query by query in a fixed order (runtime.attention), so that a forward of k
        # tokens gives each exactly what k one-token steps give: set by the engine when the
        # weights' kernels round activations (quicksilver.kernels).
        self.exact_attention = False
        # A view (``rows``) shares its root's storage; lazily allocated state lives there.
        # The cache a view looks into; None for a cache itself (holding ``self`` here would be
        # a reference cycle, keeping a dropped cache's memory until the cyclic collector ran).
        self._viewed: KVCache | None = None
        self._first_row = 0

    def rows(self, first: int, last: int) -> KVCache:
        """Rows ``first..last-1`` as a cache of their own that shares this one's storage
        (writes, rollbacks and policy state go through to it), so a forward can run a
        contiguous part of a larger cache without copying it. The whole range is ``self``."""
        if self._viewed is not None:
            raise QuicksilverError("a view of a KV cache cannot be viewed again")
        if not 0 <= first < last <= self.batch_size:
            raise QuicksilverError(f"rows {first}..{last - 1} are not rows of this cache")
        if first == 0 and last == self.batch_size:
            self._refresh_shape_flags()
            return self
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.k, view.v = self.k[:, first:last], self.v[:, first:last]
        view.start, view.lengths = self.start[first:last], self.lengths[first:last]
        view.prompt_end = None if self.prompt_end is None else self.prompt_end[first:last]
        view._viewed, view._first_row = self, first
        view._refresh_shape_flags()
        return view

    def _refresh_shape_flags(self) -> None:
        """Derive the shared length and the padding flag from the per-row tensors (after rows
        were written through a view, moved or reset)."""
        lengths = self.lengths
        same = bool((lengths == lengths[0]).all())
        self._shared_length = int(lengths[0]) if same else None
        self._padded = bool((self.start > 0).any())

    @property
    def _root_cache(self) -> KVCache:
        """The cache whose storage this one reads: itself, or the cache a view looks into."""
        return self._viewed if self._viewed is not None else self

    @property
    def visible(self) -> torch.Tensor | None:
        """bool [L, B, T]: may the entry be read (None: every entry may)."""
        root = self._root_cache
        if root._visible is None or root is self:
            return root._visible
        return root._visible[:, self._first_row : self._first_row + self.batch_size]

    @property
    def log_size(self) -> torch.Tensor | None:
        """float32 [L, B, T]: log of the tokens each entry stands for (None: one each)."""
        root = self._root_cache
        if root._log_size is None or root is self:
            return root._log_size
        return root._log_size[:, self._first_row : self._first_row + self.batch_size]

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
        be read by the plain dense attention (kept for the whole cache, views included)."""
        return self._root_cache._adapted

    def left_pad(self, lengths: Sequence[int]) -> int:
        """Place rows of these prompt lengths right-aligned in a fresh cache; returns the
        block width (the longest prompt)."""
        longest = max(lengths)
        self.start.copy_(torch.tensor([longest - n for n in lengths], dtype=torch.long))
        self._padded = any(n != longest for n in lengths)
        return longest

    def set_prompt_end(self, ends: int | Sequence[int] | None = None) -> None:
        """Where each row's prompt ends (one slot for all rows or one per row; None: what is
        written so far is prompt). Slots from there on hold generated tokens."""
        value = self.lengths if ends is None else torch.as_tensor(ends, dtype=torch.long)
        if self.prompt_end is not None:  # in place: a view shares it with its whole cache
            self.prompt_end.copy_(value.expand(self.batch_size))
        elif self._viewed is not None:
            raise QuicksilverError("set the prompt boundary on the whole cache before its views")
        else:
            self.prompt_end = value.expand(self.batch_size).clone()

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
        allowed = causal_reads(self.start[rows], q_slots, keys, self.sliding_window)
        if layer is not None and self.visible is not None:
            key_index = keys if keys.dim() == 2 else keys.expand(len(rows), -1)
            allowed &= self.visible[layer, rows.unsqueeze(-1), key_index]
        return allowed

    # ------------------------------------------------------------------ policy state

    def hide(self, layer: int, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Entries that later queries must not read (skipped or merged-away tokens)."""
        root = self._root_cache
        if root._visible is None:
            root._visible = torch.ones(
                root.k.shape[:2] + (root.max_len,), dtype=torch.bool, device=root.k.device
            )
        self.visible[layer, rows, slots] = False
        root._adapted = True

    def set_log_sizes(
        self, layer: int, rows: torch.Tensor, slots: torch.Tensor, log_sizes: torch.Tensor
    ) -> torch.Tensor:
        """Record how many tokens each entry stands for; returns the layer's [B, T] table."""
        root = self._root_cache
        if root._log_size is None:
            root._log_size = torch.zeros(root.k.shape[:2] + (root.max_len,), device=root.k.device)
        table = self.log_size
        table[layer, rows, slots] = log_sizes
        if bool((log_sizes != 0).any()):
            root._adapted = True
        return table[layer]

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
            torch.minimum(self.prompt_end, self.lengths, out=self.prompt_end)
        self._refresh_shape_flags()
        self._root_cache._recheck_adapted()

    def _recheck_adapted(self) -> None:
        visible, log_size = self._visible, self._log_size
        self._adapted = (visible is not None and not bool(visible.all())) or (
            log_size is not None and bool((log_size != 0).any())
        )

    # ------------------------------------------------------------------ rows that come and go

    @torch.inference_mode()
    def move_row(self, source: int, target: int) -> None:
        """Copy row ``source``'s entries and state into row ``target`` (of the whole cache),
        so the rows in use stay contiguous when one leaves; ``source`` is reset."""
        if self._viewed is not None:
            raise QuicksilverError("rows are moved in the whole cache, not in a view")
        end = int(self.lengths[source])
        self.k[:, target, :, :end] = self.k[:, source, :, :end]
        self.v[:, target, :, :end] = self.v[:, source, :, :end]
        for table in (self._visible, self._log_size):
            if table is not None:
                table[:, target] = table[:, source]
        self.start[target] = self.start[source]
        self.lengths[target] = self.lengths[source]
        if self.prompt_end is not None:
            self.prompt_end[target] = self.prompt_end[source]
        self.reset_row(source)

    @torch.inference_mode()
    def reset_row(self, row: int) -> None:
        """Empty row ``row`` (of the whole cache) for a new sequence: as if never written."""
        if self._viewed is not None:
            raise QuicksilverError("rows are reset in the whole cache, not in a view")
        end = int(self.lengths[row])
        self.k[:, row, :, :end] = 0
        self.v[:, row, :, :end] = 0
        if self._visible is not None:
            self._visible[:, row] = True
        if self._log_size is not None:
            self._log_size[:, row] = 0
        self.start[row] = 0
        self.lengths[row] = 0
        if self.prompt_end is not None:
            self.prompt_end[row] = 0
        self._recheck_adapted()


def room_for(config: ModelConfig, needed: int, draft_tokens: int = 0) -> int:
    """Cache slots for rows that need ``needed`` positions: with drafts of up to
    ``draft_tokens``, room for a full draft past the end (rows feed the batch's longest
    draft), within the model's positions."""
    return max(needed, min(needed + draft_tokens, config.max_position_embeddings))


def left_padded(prompt: Sequence[int], width: int, pad: int) -> torch.Tensor:
    """A prompt right-aligned in ``width`` slots, ``pad`` before it (rows of one block)."""
    padded = torch.full((width,), pad, dtype=torch.long)
    padded[width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
    return padded


def pad_token_id(config: ModelConfig) -> int:
    """The one filler id for positions nobody reads (left padding, rolled-back drafts)."""
    return config.eos_token_ids[0] if config.eos_token_ids else 0
