"""The one attention function: queries of a forward over the entries the cache lets them read.

``attend`` picks how to compute it from who is asking, never what is computed:
- the whole [B, S] block (every token runs the layer, nothing hidden in the cache): one
  SDPA call, causal or with the block's mask; one query per row uses two small matmuls per KV
  head group instead (SDPA's GQA path would copy K/V);
- gathered tokens with one query per row (decoding under a policy) whose reads include no
  hidden entry: every row in one call, padding masked;
- otherwise row by row, in chunks of queries, with hidden entries gathered *out* of the keys,
  so their scores are never computed (a mask would compute them and hide the cost).
Returns the outputs and the (query, key) pairs actually scored, for the FLOP counter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quicksilver import kernels
from quicksilver.runtime.cache import KVCache
from quicksilver.runtime.context import ForwardContext

# Queries per attention call on the row-by-row path. Gathered queries are not a contiguous
# causal block, so the kernel cannot skip the masked upper triangle by itself; giving each
# chunk only the keys up to its last query's slot skips most of it.
QUERY_CHUNK = 128


def attend(
    q: torch.Tensor,
    context: ForwardContext,
    layer: int,
    index: torch.Tensor | None = None,
    log_size: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Attention of queries over the layer's cache (their own K/V already written).

    ``index`` None: q is the block's [B, S, heads, hd]; returns [B, S, heads * hd].
    Otherwise q is [N, 1, heads, hd] for the block's flat tokens ``index`` (row-major, slots
    increasing within a row); returns [N, 1, heads * hd]. ``log_size`` ([B, T]) adds
    log(tokens an entry stands for) to its scores (fusion's proportional attention).
    """
    cache = context.cache
    if index is None:
        return _block(q, cache, layer, context), context.attended_pairs()
    rows = context.rows_of()[index]
    slots = context.slots.reshape(-1)[index]
    if len(rows) == 1 or bool((rows[1:] > rows[:-1]).all()):
        reads = _reads_without_hidden(cache, layer, rows, slots)
        if reads is not None:
            return _one_per_row(q, cache, layer, rows, reads, log_size), int(reads.sum())
    return _row_by_row(q[:, 0], cache, layer, rows, slots, log_size)


# Blocks of up to this many tokens per row (decode steps, verify forwards) attend query by
# query when the cache asks for exact rows; longer ones (prefills) use SDPA.
EXACT_QUERIES = 64


def _block(q: torch.Tensor, cache: KVCache, layer: int, context: ForwardContext) -> torch.Tensor:
    keys = cache.k[layer, :, :, : context.attend_len]
    values = cache.v[layer, :, :, : context.attend_len]
    if cache.exact_attention and q.shape[1] <= EXACT_QUERIES:
        return _exact(q, keys, values, context.query_reads())
    return _masked(q, keys, values, context.mask)


def attend_reads(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    reads: torch.Tensor,
    exact: bool = False,
) -> torch.Tensor:
    """q [B, S, heads, hd] over keys/values [B, kv_heads, T, hd], each query reading the
    slots ``reads`` [B, S, T] marks -> [B, S, heads * hd]: the compiled graph's attention, for
    decode steps (S = 1) and verify forwards alike. ``exact``: each query alone in a fixed
    order (``kernels.attend_each``), for weights whose kernels round activations."""
    if exact:
        return _exact(q, keys, values, reads.contiguous())
    return _masked(q, keys, values, reads.unsqueeze(1))


def _masked(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """q [B, S, heads, hd] over keys/values [B, kv_heads, T, hd] -> [B, S, heads * hd].
    ``mask`` [B, 1, S, T] (True = read), or None: a causal block from slot 0, or one query per
    row reading every slot. One query per row: two small matmuls (``grouped_one_query``);
    more: one SDPA call."""
    batch, seq, heads, head_dim = q.shape
    if seq == 1:
        return grouped_one_query(q, keys, values, mask)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        keys,
        values,
        attn_mask=mask,
        is_causal=mask is None,
        enable_gqa=keys.shape[1] != heads,
    )
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def grouped_one_query(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per row ([N, 1, heads, hd]) over keys/values [N, kv_heads, T, hd].

    With a single query the query heads that share a KV head form a small matrix, so two
    batched matmuls do the work without expanding K/V. ``bias`` (broadcast to the scores,
    e.g. [N, 1, 1, T]) is added before the mask ([N, 1, 1, T], True = read). In float32:
    CPU bf16 batched matmuls on cache slices are several times slower.
    """
    n, _, heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(n, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped.float(), keys.float().transpose(-1, -2)) * head_dim**-0.5
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, values.float()).to(q.dtype).reshape(n, 1, heads * head_dim)


def _exact(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, reads: torch.Tensor
) -> torch.Tensor:
    """q [B, S, heads, hd] over the keys ``reads`` [B, S, T] marks, each query alone in a fixed
    order (``kernels.attend_each``) -> [B, S, heads * hd] in q's dtype."""
    batch, seq, heads, head_dim = q.shape
    out = kernels.attend_each(q.float().contiguous(), keys, values, reads, head_dim**-0.5)
    return out.to(q.dtype).reshape(batch, seq, heads * head_dim)


def _reads_without_hidden(
    cache: KVCache, layer: int, rows: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor | None:
    """[N, last slot + 1] bool: the entries each row's single query reads, or None when one
    of them is hidden (hidden entries must be gathered out, which the row-by-row path does)."""
    keys = torch.arange(int(slots.max()) + 1)
    reads = cache.readable(rows, slots, keys)
    if cache.visible is not None and not bool(
        (cache.visible[layer, rows, : len(keys)] | ~reads).all()
    ):
        return None
    return reads


def _one_per_row(
    q: torch.Tensor,
    cache: KVCache,
    layer: int,
    rows: torch.Tensor,
    reads: torch.Tensor,
    log_size: torch.Tensor | None,
) -> torch.Tensor:
    n, end = reads.shape
    if n == cache.batch_size:  # every row, in order: slices, not gathers
        keys, values = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
    else:
        keys, values = cache.k[layer, rows, :, :end], cache.v[layer, rows, :, :end]
    bias = None
    if log_size is not None:
        # rounded to the model's dtype first, as on the row-by-row path
        bias = log_size[rows, :end].to(q.dtype).float().view(n, 1, 1, end)
    return grouped_one_query(q, keys, values, reads.view(n, 1, 1, end), bias)


def _row_by_row(
    q: torch.Tensor,
    cache: KVCache,
    layer: int,
    rows: torch.Tensor,
    slots: torch.Tensor,
    log_size: torch.Tensor | None,
) -> tuple[torch.Tensor, int]:
    """q [N, heads, hd] -> ([N, 1, heads * hd], pairs), chunks of one row's queries."""
    unique_rows, counts = torch.unique_consecutive(rows, return_counts=True)
    k_cache, v_cache = cache.k[layer], cache.v[layer]
    gqa = q.shape[1] != k_cache.shape[1]
    outputs, pairs, offset = [], 0, 0
    for row, count in zip(unique_rows.tolist(), counts.tolist(), strict=True):
        first_key = int(cache.start[row])
        for lo in range(offset, offset + count, QUERY_CHUNK):
            hi = min(lo + QUERY_CHUNK, offset + count)
            chunk_slots = slots[lo:hi]
            if cache.sliding_window:
                first_key = max(first_key, int(chunk_slots[0]) - cache.sliding_window + 1)
            span = torch.arange(first_key, int(chunk_slots[-1]) + 1)
            allowed = cache.readable(rows[lo:hi], chunk_slots, span, layer)
            read_by_any = allowed.any(dim=0)
            if bool(read_by_any.all()):
                keys = span
                end = int(span[-1]) + 1
                k, v = (
                    k_cache[row : row + 1, :, first_key:end],
                    v_cache[row : row + 1, :, first_key:end],
                )
            else:  # entries nobody here may read are left out of the product
                keys = span[read_by_any]
                allowed = allowed[:, read_by_any]
                k, v = k_cache[row : row + 1, :, keys], v_cache[row : row + 1, :, keys]
            pairs += int(allowed.sum())
            if log_size is not None:
                bias = log_size[row, keys].to(q.dtype).expand(hi - lo, -1)
                mask = bias.masked_fill(~allowed, float("-inf"))
            else:
                mask = allowed
            out = F.scaled_dot_product_attention(
                q[lo:hi].transpose(0, 1).unsqueeze(0),
                k,
                v,
                attn_mask=mask.view(1, 1, hi - lo, len(keys)),
                enable_gqa=gqa,
            )
            outputs.append(out[0].transpose(0, 1))
        offset += count
    out = torch.cat(outputs)
    return out.reshape(out.shape[0], 1, -1), pairs
