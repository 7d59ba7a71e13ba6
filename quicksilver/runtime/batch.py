"""Rows that come and go: the step core every generation runs through.

A ``StepBatch`` owns one KV cache of ``max_rows`` rows and a table of rows (each with its
prompt, its own sampling settings and random stream, stop ids, token budget and finish
state). Rows are *admitted* at any time and wait until a cache row is free; ``step()`` then

1. prefills waiting rows, left-padded together as a group and fed in chunks of at most
   ``prefill_tokens`` prompt tokens per step, so rows already running keep streaming while a
   long prompt goes in (vLLM's ``max_num_batched_tokens`` idea), and
2. runs one forward for the running rows, in which each row feeds its last token plus any
   drafted tokens (``speculative``): the drafts the model agrees with are accepted, the rest
   rolled back with ``KVCache.truncate`` (policy state included), so the output is exactly the
   plain decoder's. Without drafts this is ordinary one-token-per-step decoding. Then
3. runs one piece of a drafting plan being measured for the engine's policy, if any
   (``speculative.plans``): measuring never holds up a row for more than one piece.

It returns per-row events (new tokens, their log-probs when asked, a finish reason). A row
that finishes or is cancelled leaves at once: the last row in use moves into its cache row,
so the rows in use stay contiguous and every forward runs on a slice of the cache (no
gathers, no rows riding along). Single-threaded: the caller (``LLM``) serialises access.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import TYPE_CHECKING

import torch

from quicksilver.errors import QuicksilverError
from quicksilver.runtime.cache import left_padded, pad_token_id, sequence_fit_error
from quicksilver.runtime.rows import Row, RowEvent, RowSpec, StepStats
from quicksilver.runtime.sampling import check_logits, greedy_tokens, sample_tokens, uniform_at
from quicksilver.runtime.speculative.acceptance import accept_drafts
from quicksilver.runtime.speculative.chooser import Drafter
from quicksilver.runtime.speculative.plans import DraftPlans
from quicksilver.runtime.speculative.settings import FUSION_NOT_VERIFIABLE, splits_change_output

if TYPE_CHECKING:  # the runner never imports this module: generation is built on the runner
    from quicksilver.runtime.engine import Engine

# Prompt tokens fed per step while rows are running; a prompt longer than this goes in chunks.
DEFAULT_PREFILL_TOKENS = 512


class StepBatch:
    """Continuous batching over one KV cache (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_rows: int,
        max_len: int,
        prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
        plans: DraftPlans | None = None,
    ) -> None:
        if max_rows < 1 or max_len < 1 or prefill_tokens < 1:
            raise QuicksilverError("a step batch needs max_rows, max_len and prefill_tokens >= 1")
        self.engine = engine
        self.max_rows = max_rows
        self.max_len = max_len
        self.prefill_tokens = prefill_tokens
        self.cache = engine.new_cache(max_rows, max_len)
        self.cache.set_prompt_end(0)
        self.pad_id = pad_token_id(engine.config)
        self.stats = StepStats()
        self._ids = itertools.count()
        self._rows: dict[int, Row] = {}
        self._waiting: deque[Row] = deque()
        self._running: list[Row] = []  # cache rows 0..R-1, in this order
        self._group: list[Row] = []  # cache rows R..R+P-1, their prompts going in
        self._group_width = 0
        self._group_cursor = 0
        # Drafting plans, shared with every batch on this model (None: this batch's own).
        self.plans = plans if plans is not None else DraftPlans()
        self.drafter = Drafter(engine, self.plans, self.stats)

    # ------------------------------------------------------------ the row table

    def fit_error(self, spec: RowSpec) -> str | None:
        """Why a row cannot run in this batch (None if it can): the one fit rule. The
        prompt and every generated token but the last go through the cache."""
        if not spec.prompt:
            return "the prompt has no tokens"
        if spec.max_new_tokens < 1:
            return f"max_new_tokens must be at least 1, got {spec.max_new_tokens}"
        return sequence_fit_error(
            len(spec.prompt),
            spec.max_new_tokens,
            self.max_len,
            f"the {self.max_len} this batch holds",
        )

    def admit(self, spec: RowSpec) -> int:
        """Queue a row; it starts when a cache row is free. Returns its id."""
        error = self.fit_error(spec)
        if error is not None:
            raise QuicksilverError(error)
        row = Row(next(self._ids), spec)
        self._rows[row.id] = row
        self._waiting.append(row)
        return row.id

    def row(self, row_id: int) -> Row:
        return self._rows[row_id]

    def finish(self, row_id: int, reason: str = "stop") -> None:
        """End a row now (a stop string, a client gone); its cache row is free at once."""
        row = self._rows.pop(row_id, None)
        if row is None:
            return
        if row.finish_reason is None:
            row.finish_reason = reason
        self._free(row)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._group or self._running)

    @property
    def active_rows(self) -> int:
        """Rows holding a cache row (running or having their prompt fed)."""
        return len(self._running) + len(self._group)

    @property
    def waiting_rows(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(self) -> list[RowEvent]:
        """Prefill what waits (a chunk), decode what runs; events in row order of the table."""
        events: dict[int, RowEvent] = {}
        if not self._group:
            self._start_group()
        decoding = len(self._running)
        if self._group:
            self._prefill_chunk(events)
        if decoding:
            self._decode(decoding, events)
        self._measure_plan()
        for event in events.values():
            if event.finish_reason is not None:
                row = self._rows.pop(event.row, None)
                if row is not None:
                    self._free(row)
        return list(events.values())

    def _start_group(self) -> None:
        """Give the oldest waiting rows cache rows, as many as fit the prefill budget (the
        first always goes, in chunks if it is long)."""
        free = self.max_rows - len(self._running)
        group: list[Row] = []
        width = 0
        while self._waiting and len(group) < free:
            candidate = max(width, len(self._waiting[0].spec.prompt))
            if group and (len(group) + 1) * candidate > self.prefill_tokens:
                break
            group.append(self._waiting.popleft())
            width = candidate
        if not group:
            return
        first = len(self._running)
        view = self.cache.rows(first, first + len(group))
        view.left_pad([len(r.spec.prompt) for r in group])
        view.set_prompt_end(width)
        for row in group:
            row.padded = left_padded(row.spec.prompt, width, self.pad_id)
        self._group, self._group_width, self._group_cursor = group, width, 0

    def _prefill_chunk(self, events: dict[int, RowEvent]) -> None:
        group, first = self._group, len(self._running)
        cursor, width = self._group_cursor, self._group_width
        columns = min(width - cursor, max(1, self.prefill_tokens // len(group)))
        if splits_change_output(self.engine.policy):
            columns = width - cursor  # one forward: how tokens are split would change them
        block = torch.stack([r.padded[cursor : cursor + columns] for r in group])
        last = cursor + columns == width
        view = self.cache.rows(first, first + len(group))
        engine = self.engine
        before = engine.counter.summary()
        start = time.perf_counter()
        logits = engine.forward(block, view, logits_at="last" if last else torch.arange(0))
        self.stats.prefill_seconds += time.perf_counter() - start
        self.stats.fed_tokens += block.numel()
        self._attribute(group, [columns] * len(group), before)
        self._group_cursor = cursor + columns
        if not last:
            return
        chosen = self._choose(group, logits)
        self._running.extend(group)
        self._group, self._group_width, self._group_cursor = [], 0, 0
        for row, token, row_logits in zip(group, chosen, logits, strict=True):
            row.padded = None
            self._emit(row, [token], row_logits.unsqueeze(0), events)

    def _decode(self, n: int, events: dict[int, RowEvent]) -> None:
        rows = self._running[:n]
        if any(row.spec.speculative is not None for row in rows):
            if splits_change_output(self.engine.policy):  # callers check it up front too
                raise QuicksilverError(FUSION_NOT_VERIFIABLE)
            # Every row feeds k + 1 tokens (short drafts padded, then rolled back): keep the
            # furthest slot inside the cache, whose slots are all valid positions.
            room = self.max_len - 1 - int(self.cache.lengths[:n].max())
            draft_start = time.perf_counter()
            drafts = self.drafter.drafts(rows, self.cache, room, self._attribute)
            self.stats.decode_seconds += time.perf_counter() - draft_start
        else:
            drafts = [[] for _ in rows]
        k = max(map(len, drafts))
        fed = torch.empty((n, k + 1), dtype=torch.long)
        for i, (row, draft) in enumerate(zip(rows, drafts, strict=True)):
            # Rows with fewer drafts repeat their last token: computed, then rolled back.
            fed[i] = torch.tensor([row.tokens[-1], *draft] + [row.tokens[-1]] * (k - len(draft)))
        engine, stats = self.engine, self.stats
        view = self.cache.rows(0, n)
        before = engine.counter.summary()
        compiled_before = engine.compile_seconds
        start = time.perf_counter()
        logits = engine.forward(fed, view, logits_at="last" if k == 0 else "all")
        if k == 0:
            chosen = self._choose(rows, logits)
            for row, token, row_logits in zip(rows, chosen, logits, strict=True):
                self._emit(row, [token], row_logits.unsqueeze(0), events)
        else:
            self._verify(rows, drafts, fed, logits, view, events)
        compiled = engine.compile_seconds - compiled_before
        stats.compile_seconds += compiled
        stats.decode_seconds += time.perf_counter() - start - compiled
        stats.decode_steps += 1
        stats.decode_tokens += sum(len(events[row.id].tokens) for row in rows)
        stats.fed_tokens += fed.numel()
        spent = self._attribute(rows, [k + 1] * n, before)
        for key, value in spent.items():
            stats.decode_flops[key] = stats.decode_flops.get(key, 0) + value
        if k:
            stats.verify_flops += spent["total"]

    def _measure_plan(self) -> None:
        """One piece of a drafting plan measurement under way for this engine's policy
        (whichever batch began it), after this step's own forwards: a measurement delays
        the next token by one piece at most. Its time is kept apart from decoding."""
        start = time.perf_counter()
        try:
            measuring = self.plans.advance(self.engine)
        except Exception as err:  # the rows decode on whatever the measurement's failure
            self.plans.give_up(self.engine)
            self.stats.plan_notes.append(
                f"measuring the drafting plan failed ({type(err).__name__}: {err}); drafting "
                "with n-grams only"
            )
            return
        if measuring is None:
            return
        self.stats.calibration_seconds += time.perf_counter() - start
        if measuring.done:
            self.stats.plan_notes.append(
                f"drafting plan ready, measured in {measuring.seconds:.1f} s between steps"
            )

    # ------------------------------------------------------------ choosing tokens

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """One token per row ([N, V] logits), each with its own settings and the uniform of
        its stream at its position: a seeded row's text does not depend on which
        rows share the batch."""
        check_logits(logits)
        best = greedy_tokens(logits).tolist()
        chosen = []
        for i, row in enumerate(rows):
            sampling = row.spec.sampling
            if sampling.greedy:
                chosen.append(best[i])
            else:
                uniform = uniform_at(row.draw_key, len(row.tokens))
                chosen.append(int(sample_tokens(logits[i : i + 1], sampling, [uniform])[0]))
        return chosen

    def _verify(
        self,
        rows: list[Row],
        drafts: list[list[int]],
        fed: torch.Tensor,
        logits: torch.Tensor,
        view,
        events: dict[int, RowEvent],
    ) -> None:
        """Accept each row's drafted tokens as far as the full model agrees (greedy: the
        argmax; sampling: the lossless rejection rule), emit them and the model's own next
        token, and roll back the slots of the rest."""
        k = fed.shape[1] - 1
        check_logits(logits.reshape(-1, logits.shape[-1]))
        rollback = []
        stats = self.stats
        for i, (row, draft) in enumerate(zip(rows, drafts, strict=True)):
            uniforms = [uniform_at(row.draw_key, len(row.tokens) + j) for j in range(k + 1)]
            accepted, token = accept_drafts(logits[i], draft, row.spec.sampling, uniforms)
            emitted = draft[:accepted] + [token]
            rollback.append(k - accepted)
            if draft:
                stats.drafts += 1
                stats.draft_tokens += len(draft)
                stats.accepted_tokens += accepted
                while len(stats.accepted_at) < len(draft):
                    stats.accepted_at.append(0)
                for position in range(accepted):
                    stats.accepted_at[position] += 1
                self.drafter.record(row, accepted, len(draft))
            self._emit(row, emitted, logits[i, : accepted + 1], events)
        view.truncate(torch.tensor(rollback), list(range(len(rows))))

    def _emit(
        self, row: Row, tokens: list[int], logits: torch.Tensor, events: dict[int, RowEvent]
    ) -> None:
        """Append tokens to a row up to a stop id or its budget; record the event."""
        event = events.get(row.id)
        if event is None:
            event = events[row.id] = RowEvent(row.id, [])
            if row.spec.logprobs is not None:
                event.logprobs, event.top = [], []
        kept = []
        for token in tokens:
            kept.append(token)
            row.tokens.append(token)
            if token in row.spec.stop_ids:
                row.finish_reason = "stop"
            elif row.remaining <= 0:
                row.finish_reason = "length"
            if row.finish_reason is not None:
                break
        event.tokens.extend(kept)
        event.finish_reason = row.finish_reason
        if row.spec.logprobs is not None:
            logprobs = torch.log_softmax(logits[: len(kept)].float(), dim=-1)
            picked = logprobs.gather(1, torch.tensor(kept)[:, None])[:, 0]
            event.logprobs.extend(picked.tolist())
            top = row.spec.logprobs
            if top:
                values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
                event.top.extend(
                    list(zip(i, v, strict=True))
                    for i, v in zip(indices.tolist(), values.tolist(), strict=True)
                )
            else:
                event.top.extend([] for _ in kept)

    # ------------------------------------------------------------ cost and cache rows

    def _attribute(self, rows: list[Row], fed: list[int], before: dict[str, int]) -> dict[str, int]:
        """Split a forward's counted and dense-equivalent FLOPs among its rows by the tokens
        each fed (the engine counted both while it ran); returns what the forward spent."""
        spent = self.engine.counter.since(before)
        for key, value in spent.items():
            self.stats.flops[key] = self.stats.flops.get(key, 0) + value
        total = sum(fed) or 1
        for row, n in zip(rows, fed, strict=True):
            row.flops += spent["total"] * n / total
            row.dense_flops += spent["dense"] * n / total
        return spent

    def _free(self, row: Row) -> None:
        """Take a finished or cancelled row out; keep the rows in use contiguous."""
        cache = self.cache
        self.drafter.forget(row.id)
        if row in self._waiting:
            self._waiting.remove(row)
            return
        running, group = self._running, self._group
        if row in running:
            hole, last = running.index(row), len(running) - 1
            if hole != last:
                cache.move_row(last, hole)
                running[hole] = running[last]
            else:
                cache.reset_row(last)
            running.pop()
            if group:  # the group's last row moves down into the freed cache row
                cache.move_row(last + len(group), last)
                group.insert(0, group.pop())
        elif row in group:
            first = len(running)
            hole, last = group.index(row), len(group) - 1
            if hole != last:
                cache.move_row(first + last, first + hole)
                group[hole] = group[last]
            else:
                cache.reset_row(first + last)
            group.pop()
            if not group:
                self._group_width = self._group_cursor = 0
