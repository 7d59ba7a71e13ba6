"""Decode steps and verify forwards as compiled graphs: n tokens per row through every layer.

An eager decode step of a small model is mostly fixed cost: thousands of tiny aten calls
(norms, RoPE, casts, views, cache writes), each a few microseconds, around the few that
matter (the weight products). ``torch.compile`` fuses those into a handful of kernels. The
graph is the same code the eager runner runs (``Block.forward`` around
``runtime.attention.attend_reads``), traced for one token per row (decode steps) and for
2..``MAX_TOKENS`` (verify forwards, their length a dynamic dimension, logits at every
position), each for one row and for 2..``max_rows`` (the batch a dynamic dimension too):

- the KV cache is static: the graph writes each row's new K/V at its slots in place and reads
  the first ``read_len`` slots, masked by the cache's rule (``start <= key <= slot``, the
  sliding window); ``read_len`` is a dynamic dimension rounded up to ``READ_BUCKET`` slots,
  so the graph is never re-traced as positions advance and attention costs what is filled,
  not what is allocated;
- weights are the graph's attributes, not its inputs (dynamo's ``install_free_tensors``), so
  inductor's freezing makes them constants: the dense formats get oneDNN's pre-packed
  products (as inputs they got plain matmuls, slower than eager) and the int4/int8 formats
  call their kernels directly;

- every cast is rounded as eager rounds it (inductor's ``emulate_precision_casts``), so in
  bf16 the two graphs agree bit for bit: with weights that round activations (our kernels) a
  verify forward must give each token the decode step's logits exactly, or verified decoding
  would not reproduce plain decoding's tokens.

Compilation is cached on disk by inductor (its default cache, or ``TORCHINDUCTOR_CACHE_DIR``);
its time is measured and reported apart from decode time (``compile_seconds``). Only dense
forwards are compiled: a cache with hidden or fused entries, a policy step, a self-draft
forward or a prefill runs the eager path.
"""

from __future__ import annotations

import time
import types

import torch
from torch import nn

from quicksilver.models.transformer import Transformer
from quicksilver.runtime.attention import attend_reads
from quicksilver.runtime.cache import KVCache, causal_reads

# Attention reads the filled slots rounded up to this many (a few masked slots of slack).
READ_BUCKET = 64
# Rows up to which the compiled graphs pay. Measured on SmolLM2-135M, 2 AVX-512 cores
# (docs/benchmarks/engine.md): at 8 rows int4 decodes 1.39x eager on torch's kernels, 1.11x
# on ours, and bf16 1.48x (its weights are the graph's constants, which inductor pre-packs
# for oneDNN as the eager fast path does). Larger batches run eager, untried.
MAX_ROWS = 8
# Tokens per row up to which forwards run compiled: decode steps and verify forwards (a draft
# of up to MAX_TOKENS - 1 tokens and the token before it); prefills run eager.
MAX_TOKENS = 32
COMPILE_OPTIONS = {"freezing": True, "cpp_wrapper": True, "emulate_precision_casts": True}
_ARGUMENTS = ("tokens", "slots", "start", "keys", "k_cache", "v_cache")
# The model's tensors as the graph's attributes (see CompiledDecode.__call__), where this torch
# has the setting.
_FREE_TENSORS = (
    {"install_free_tensors": True} if hasattr(torch._dynamo.config, "install_free_tensors") else {}
)


def _argument_guards(guards: list) -> list[bool]:
    """Keep only the guards on the step's own arguments (their sizes, strides and dtypes) and
    on its dynamic sizes. The thousands of others (every module attribute the trace read)
    can never fail: the graph's code object belongs to one model, whose weights are frozen
    into it. Evaluating them cost ~0.4 ms a step, 8% of an int4 token. (A model changed after
    its first compiled call, its weights or its fast path, is not seen by the graph either
    way, since freezing bakes it in: load it again.)"""
    return [
        guard.guard_type == "SHAPE_ENV"
        or (guard.guard_type == "TENSOR_MATCH" and guard.name.strip("L[]'\"") in _ARGUMENTS)
        for guard in guards
    ]


class _DecodeGraph(nn.Module):
    """tokens [B, n] -> logits [B, n, V], writing K/V at ``slots`` and reading ``keys``."""

    def __init__(self, model: Transformer, exact_attention: bool) -> None:
        super().__init__()
        self.model = model
        self.exact_attention = exact_attention  # as the engine's eager forwards attend

    def forward(
        self,
        tokens: torch.Tensor,  # [B, n] int64
        slots: torch.Tensor,  # [B, n] int64: where each token goes
        start: torch.Tensor,  # [B, 1] int64: each row's first real slot
        keys: torch.Tensor,  # [read_len] int64: 0..read_len-1 (its length is dynamic)
        k_cache: torch.Tensor,  # [L, B, kv_heads, T, hd]
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        model = self.model
        batch, n = tokens.shape
        positions = slots - start
        h = model.embed_tokens(tokens, positions)
        rope = model.rope_for(positions)
        reads = causal_reads(start, slots, keys, model.config.sliding_window)  # [B, n, T]
        rows = torch.arange(batch, device=tokens.device).view(batch, 1).expand(batch, n)
        read_len = keys.shape[0]
        for layer, block in enumerate(model.blocks):

            def attention(normed: torch.Tensor, layer: int = layer, block=block) -> torch.Tensor:
                q, k, v = block.attn.project(normed, rope)
                # The layer as a tensor index: an int would make the write go through a
                # view (k_cache[layer]), which the compiled graph turned into copies of the
                # whole cache, every layer, every step (2.5 ms a token at 300 slots, growing
                # with the cache); indexed by tensors it is one in-place index_put.
                at_layer = torch.full_like(slots, layer)
                k_cache[at_layer, rows, :, slots] = k
                v_cache[at_layer, rows, :, slots] = v
                out = attend_reads(
                    q,
                    k_cache[layer, :, :, :read_len],
                    v_cache[layer, :, :, :read_len],
                    reads,
                    exact=self.exact_attention,
                )
                return block.attn.out(out)

            h = block(h, attention)
        return model.logits(h)


class CompiledDecode:
    """The model's dense decode step, compiled on first use for each batch size."""

    def __init__(self, model: Transformer, exact_attention: bool) -> None:
        """``exact_attention``: attend query by query, as the engine does for weights whose
        kernels round activations (``Engine.exact_attention``)."""
        self.model = model
        graph = _DecodeGraph(model, exact_attention)
        # A code object of its own: dynamo keys compiled code by code object, so this
        # model's graph (its weights are constants in it) can never serve another model's
        # call, and the per-call guards can be skipped (see __call__).
        forward = _DecodeGraph.forward
        graph.forward = types.MethodType(
            types.FunctionType(forward.__code__.replace(), forward.__globals__, "forward"),
            graph,
        )
        self.graph = torch.compile(
            graph,
            fullgraph=True,
            dynamic=False,
            options={**COMPILE_OPTIONS, "guard_filter_fn": _argument_guards},
        )
        self.compile_seconds = 0.0
        self.max_rows = MAX_ROWS

    def supports(self, cache: KVCache, n_new: int = 1) -> bool:
        """Whether the compiled graph serves ``n_new`` tokens per row of this cache now: few
        enough rows and tokens for it to pay, every entry readable by the plain rule (no
        hidden or fused entries), and a whole cache: the rows still running in a batch are a
        view of its cache, with other strides, which would trace a new graph (~40 s) in the
        middle of decoding and hold up every row; they run eager instead."""
        return (
            cache.batch_size <= self.max_rows
            and 1 <= n_new <= MAX_TOKENS
            and not cache.adapted
            and cache.k.is_contiguous()
        )

    @staticmethod
    def capacity(max_len: int) -> int:
        """Slots to allocate for a cache of ``max_len``: whole buckets and one slot more, so
        the read length (whole buckets) is never the allocated length; the two being equal
        would be a second shape to trace."""
        return -(-max_len // READ_BUCKET) * READ_BUCKET + 1

    def read_len(self, cache: KVCache, slots: torch.Tensor) -> int:
        """Slots attention reads: up to the furthest new token, rounded up to a bucket."""
        needed = int(slots.max()) + 1
        return min(cache.max_len, -(-needed // READ_BUCKET) * READ_BUCKET)

    @torch.inference_mode()
    def __call__(
        self, tokens: torch.Tensor, cache: KVCache, slots: torch.Tensor, read_len: int
    ) -> torch.Tensor:
        """Logits [B, n, V] of n new tokens per row at ``slots`` ([B, n]), their K/V
        written, attention reading the first ``read_len`` slots (``self.read_len``). One graph
        serves n = 1 (a decode step), one every n from 2 to ``MAX_TOKENS`` (verify forwards:
        the draft length changes from step to step), each for one row and for 2..``max_rows``
        rows: at most four graphs, each traced once (a trace takes ~15-75 s, so none may be
        left to happen in the middle of decoding)."""
        keys = torch.arange(read_len)
        torch._dynamo.mark_dynamic(keys, 0)
        for tensor in (cache.k, cache.v):  # caches of any length share the graph
            torch._dynamo.mark_dynamic(tensor, 3)
        # Fresh, contiguous arguments: the strides are guarded, and the engine's slots may
        # be one row's slots expanded over the batch (stride 0), which would trace again.
        tokens, slots = tokens.contiguous(), slots.contiguous()
        start = cache.start.view(-1, 1).contiguous()
        if tokens.shape[1] > 1:
            for tensor in (tokens, slots):
                torch._dynamo.mark_dynamic(tensor, 1, min=2, max=MAX_TOKENS)
        if tokens.shape[0] > 1:  # one graph for every batch of 2..max_rows rows
            for tensor, dim in ((tokens, 0), (slots, 0), (start, 0), (cache.k, 1), (cache.v, 1)):
                torch._dynamo.mark_dynamic(tensor, dim)
        args = (tokens, slots, start, keys, cache.k, cache.v)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        begin = time.perf_counter()
        # No "equal sizes share a symbol": the read length may equal the cache length. The
        # model's tensors are the graph's own attributes, not inputs: as inputs, the code
        # dynamo runs before the graph fetched every weight from its module on every call
        # (~0.2 ms a forward, 5% of an int4 step).
        with (
            torch.fx.experimental._config.patch(use_duck_shape=False),
            torch._dynamo.config.patch(**_FREE_TENSORS),
        ):
            logits = self.graph(*args)
        if torch._dynamo.utils.counters["stats"]["unique_graphs"] != graphs:  # it traced
            self.compile_seconds += time.perf_counter() - begin
        return logits
