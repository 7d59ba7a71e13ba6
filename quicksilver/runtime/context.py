"""Where a block of new tokens sits: the small object one forward passes around.

A forward runs a [B, S] block of new tokens. Each token has a cache slot and a position; the
block may need an attention mask. ``ForwardContext`` holds exactly that, plus flat views of it
for the gathered path (which sees the block as B * S tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quicksilver.accounting import causal_pairs
from quicksilver.runtime.cache import KVCache


@dataclass
class ForwardContext:
    """Placement of a [B, S] block in ``cache``.

    ``write_start`` is set when row b's token s goes to slot ``write_start + s`` for every
    row (the common, fast case); otherwise ``slots`` gives each token's slot (-1: a padding
    entry, never written). ``mask`` is [B, 1, S, attend_len] (True = may attend), or None when
    the block needs none: a causal block from slot 0, or one token per row reading every
    earlier slot.
    """

    cache: KVCache
    slots: torch.Tensor  # [B, S] int64
    positions: torch.Tensor  # [B, S] int64
    write_start: int | None
    attend_len: int
    mask: torch.Tensor | None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, signed sin: [B, S, 1, hd]
    _flat_rope: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _rows_of: torch.Tensor | None = field(default=None, repr=False)
    _query_reads: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def next_block(cls, cache: KVCache, n_new: int, rope_for) -> ForwardContext:
        """Reserve each row's next ``n_new`` slots. ``rope_for(positions)`` gives the
        rotation tables (None for models without RoPE)."""
        slots, first = cache.reserve(n_new)
        positions = (slots - cache.start.view(-1, 1)).clamp(min=0)
        attend_len = (first if first is not None else int(slots[:, 0].max())) + n_new
        window = cache.sliding_window
        window_ok = not window or attend_len <= window
        plain = first is not None and not cache.padded and (first == 0 or n_new == 1)
        context = cls(cache, slots, positions, first, attend_len, None, rope_for(positions))
        if not (plain and window_ok):
            context.mask = context.block_mask()
        return context

    @property
    def batch(self) -> int:
        return self.slots.shape[0]

    @property
    def seq(self) -> int:
        return self.slots.shape[1]

    def block_mask(self) -> torch.Tensor:
        """[B, 1, S, attend_len] from the cache's rule. A padding query (before its row's
        start, or a slot -1 entry) reads its own slot only, so its output, which nobody
        uses, stays finite instead of NaN from an empty softmax."""
        keys = torch.arange(self.attend_len)
        q = self.slots.reshape(-1)
        allowed = self.cache.readable(self.rows_of(), q, keys)
        allowed |= keys == q.clamp(min=0).unsqueeze(-1)
        return allowed.view(self.batch, 1, self.seq, self.attend_len)

    def attended_pairs(self) -> int:
        """(query, key) pairs that attention scores for the whole block."""
        if self.mask is not None:
            return int(self.mask.sum())
        if self.write_start == 0:
            return self.batch * causal_pairs(self.seq, self.cache.sliding_window)
        # one token per row reading slots 0..write_start
        return self.batch * self.seq * self.attend_len

    def real(self) -> torch.Tensor:
        """[B, S] bool: tokens that exist (not left padding, not unwritten entries)."""
        return (self.slots >= 0) & (self.slots >= self.cache.start.view(-1, 1))

    # ------------------------------------------------------------------ flat views

    def rows_of(self) -> torch.Tensor:
        """The row of each token of the flattened block (built once per forward)."""
        if self._rows_of is None:
            self._rows_of = torch.arange(self.batch).repeat_interleave(self.seq)
        return self._rows_of

    def query_reads(self) -> torch.Tensor:
        """[B, S, attend_len] bool, contiguous: the slots each query of the block reads (the
        mask, or when there is none every slot up to the query's own), built once per
        forward for the layers' exact attention."""
        if self._query_reads is None:
            if self.mask is not None:
                reads = self.mask[:, 0]
            else:  # a causal block from slot 0, or one token per row reading every slot
                length = self.attend_len
                slot = torch.arange(length - self.seq, length).view(self.seq, 1)
                reads = (torch.arange(length).view(1, length) <= slot).expand(
                    self.batch, self.seq, length
                )
            self._query_reads = reads.contiguous()
        return self._query_reads

    def rope_at(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rotation tables of the flattened block's tokens ``index``: [N, 1, 1, hd]."""
        if self.rope is None:
            return None
        if self._flat_rope is None:
            cos, sin = self.rope
            self._flat_rope = (
                cos.reshape(-1, 1, 1, cos.shape[-1]),
                sin.reshape(-1, 1, 1, sin.shape[-1]),
            )
        cos, sin = self._flat_rope
        return cos[index], sin[index]
