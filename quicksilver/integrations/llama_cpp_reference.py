"""llama.cpp on the same GGUF file, timed like our engine: the reference users would pick.

Goes through ``llama-cpp-python``'s low-level bindings (the optional extra ``llama``; it
builds llama.cpp from source, about 10 minutes on 2 cores) so that several sequences decode
in one batch, as ours do: one context with a sequence per row, the prompts prefilled in one
batch, then one token per row per step, greedy (argmax of the returned logits, like our
bench), stop tokens ignored.
"""

from __future__ import annotations

import ctypes
import functools
import time
from pathlib import Path
from typing import Any

import numpy as np

from quicksilver.errors import QuicksilverError


def _bindings() -> Any:
    try:
        import llama_cpp
        from llama_cpp import llama_cpp as low
    except ImportError as err:
        raise QuicksilverError(
            "comparing with llama.cpp needs llama-cpp-python: pip install 'quicksilver-llm[llama]' "
            "(it compiles llama.cpp, about 10 minutes)"
        ) from err
    return llama_cpp, low


def llama_cpp_perplexity(
    gguf: str | Path,
    token_ids: list[int],
    *,
    context: int,
    stride: int,
    max_windows: int | None = None,
    threads: int = 2,
) -> tuple[float, int]:
    """(ppl, scored tokens) from llama.cpp's own forward of the same GGUF file, over the
    same window plan as ``eval``'s (each window decoded from an empty cache, logits kept at
    every scored position, log-softmax in float64 here): the second reference for our
    numbers, the one that reads the file's blocks as llama.cpp's kernels do."""
    import math

    from quicksilver.eval.perplexity import window_plan

    runner = LlamaCppRunner(gguf, max_rows=1, max_tokens=context, threads=threads)
    low, batch = runner.low, runner.batch
    nll, scored = 0.0, 0
    try:
        for begin, end, n_scored in window_plan(len(token_ids), context, stride)[:max_windows]:
            low.llama_memory_clear(low.llama_get_memory(runner.ctx), True)
            length = end - begin
            first = length - n_scored - 1  # the position that predicts the first scored token
            for n, token in enumerate(token_ids[begin:end]):
                batch.token[n] = token
                batch.pos[n] = n
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = 0
                batch.logits[n] = first <= n < length - 1
            batch.n_tokens = length
            if low.llama_decode(runner.ctx, batch) != 0:
                raise QuicksilverError("llama.cpp failed to decode a window")
            for n in range(first, length - 1):
                row = np.ctypeslib.as_array(
                    low.llama_get_logits_ith(runner.ctx, n), shape=(runner.n_vocab,)
                ).astype(np.float64)
                top = row.max()
                nll += top + math.log(np.exp(row - top).sum()) - row[token_ids[begin + n + 1]]
                scored += 1
    finally:
        runner.close()
    return math.exp(nll / scored), scored


class LlamaCppRunner:
    """A llama.cpp model and a context for ``max_rows`` sequences of ``max_tokens``."""

    def __init__(self, gguf: str | Path, max_rows: int, max_tokens: int, threads: int) -> None:
        package, low = _bindings()
        self.low = low
        self.version = package.__version__
        low.llama_backend_init()
        silent = low.llama_log_callback(lambda level, text, data: None)
        low.llama_log_set(silent, ctypes.c_void_p())
        self._silent = silent  # keep the callback alive
        params = low.llama_model_default_params()
        self.model = low.llama_model_load_from_file(str(gguf).encode(), params)
        if not self.model:
            raise QuicksilverError(f"llama.cpp could not load {gguf}")
        self.n_vocab = low.llama_vocab_n_tokens(low.llama_model_get_vocab(self.model))
        context = low.llama_context_default_params()
        context.n_ctx = max_rows * (max_tokens + 8)
        context.n_batch = context.n_ubatch = max_rows * max_tokens
        context.n_seq_max = max_rows
        context.n_threads = context.n_threads_batch = threads
        self.ctx = low.llama_init_from_model(self.model, context)
        if not self.ctx:
            raise QuicksilverError("llama.cpp could not create a context")
        self.batch = low.llama_batch_init(max_rows * max_tokens, 0, max_rows)
        self.path = Path(gguf)

    @functools.cached_property
    def _summary(self) -> tuple[str, int]:
        # Parsed only when a report asks: reading a GGUF's metadata takes seconds over a large
        # vocabulary, and a perplexity run never needs it.
        return _gguf_summary(self.path)

    @property
    def weights(self) -> str:
        """The file's main tensor type (e.g. ``Q4_1``)."""
        return self._summary[0]

    @property
    def weight_bytes(self) -> int:
        """The bytes of the file's tensors (what one decode step reads)."""
        return self._summary[1]

    def close(self) -> None:
        """Free the batch, the context and the model."""
        self.low.llama_batch_free(self.batch)
        self.low.llama_free(self.ctx)
        self.low.llama_model_free(self.model)

    def _decode(self, rows: list[list[int]], start: int) -> list[int]:
        """Feed each row's tokens at positions start.. (sequence = row); return each row's
        greedy next token from the logits of its last one."""
        batch, low = self.batch, self.low
        n = 0
        last = []
        for seq, tokens in enumerate(rows):
            for offset, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = start + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = offset == len(tokens) - 1
                n += 1
            last.append(n - 1)
        batch.n_tokens = n
        if low.llama_decode(self.ctx, batch) != 0:
            raise QuicksilverError("llama.cpp failed to decode a batch")
        out = []
        for index in last:
            logits = np.ctypeslib.as_array(
                low.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,)
            )
            out.append(int(logits.argmax()))
        return out

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        """(prefill seconds, decode seconds) of a greedy generation of ``new_tokens``."""
        self.low.llama_memory_clear(self.low.llama_get_memory(self.ctx), True)
        start = time.perf_counter()
        tokens = self._decode(prompts, 0)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        position = len(prompts[0])
        for _ in range(new_tokens - 1):
            tokens = self._decode([[t] for t in tokens], position)
            position += 1
        return prefill, time.perf_counter() - start

    def bench(
        self, prompts: list[list[int]], batch: int, new_tokens: int, repeats: int
    ) -> dict[str, Any]:
        """Best-of-``repeats`` prefill and decode throughput after a warm-up, in the same
        record form as ``throughput.bench_engine``."""
        from quicksilver.eval.report import summary_record

        rows = [list(p) for p in prompts[:batch]]
        self.generate(rows, new_tokens)  # warm-up
        prefill, decode = [], []
        for _ in range(repeats):
            p, d = self.generate(rows, new_tokens)
            prefill.append(p)
            decode.append(d)
        return summary_record(batch, len(rows[0]), new_tokens, prefill, decode)


def _gguf_summary(path: Path) -> tuple[str, int]:
    """The file's main tensor type (e.g. ``Q4_1``) and the bytes of its tensors (what one
    decode step reads: every weight once; a tied head is the embedding)."""
    import collections

    import gguf

    reader = gguf.GGUFReader(str(path))
    kinds = collections.Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
    return kinds.most_common(1)[0][0], int(sum(t.n_bytes for t in reader.tensors))
