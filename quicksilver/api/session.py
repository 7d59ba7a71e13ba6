"""``Batch``: the public step-level handle on a model — requests join and leave at any step.

A server (or any caller that multiplexes users) opens one with ``LLM.open_batch``, submits
requests as they arrive, calls ``step()`` in a loop and forwards each ``BatchEvent`` to the
request's owner; ``cancel`` frees a request's rows at once. Text, stop strings and log-probs
are handled here, tokens by the step core (``runtime.batch.StepBatch``). ``LLM.generate``
and ``LLM.stream`` are this same loop over one set of prompts, so there is one driver.

Every step takes the LLM's lock and runs under the batch's policy, so batches, streams and
evaluations on one ``LLM`` from several threads interleave safely (each step is serialised).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quicksilver.api.arguments import PolicySpec, Prompt, check_drafting, count
from quicksilver.api.records import BatchEvent, Completion
from quicksilver.errors import InvalidArgument
from quicksilver.policies import Policy
from quicksilver.runtime.batch import StepBatch
from quicksilver.runtime.rows import Row, RowSpec, StepStats
from quicksilver.runtime.sampling import SamplingConfig
from quicksilver.runtime.speculative.settings import SpeculativeConfig
from quicksilver.text import TextStream

if TYPE_CHECKING:
    from quicksilver.api.llm import LLM


@dataclass(frozen=True)
class Request:
    """A checked generation request (every prompt encoded, every option validated)."""

    prompts: list[list[int]]
    max_new_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...]
    stop_ids: frozenset[int]
    policy: Policy | None  # None: whatever the caller's scope uses
    logprobs: int | None = None
    speculative: SpeculativeConfig | None = None


class _Live:
    """A submitted request's row as the API follows it."""

    def __init__(self, row: Row, stream: TextStream | None, prompt: list[int]) -> None:
        self.row = row
        self.stream = stream
        self.prompt = prompt
        self.tokens: list[int] = []
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None


class Batch:
    """Continuous batching on one ``LLM`` under one policy (see the module docstring)."""

    def __init__(
        self,
        llm: LLM,
        *,
        max_rows: int,
        max_len: int,
        prefill_tokens: int,
        policy: Policy | None,
    ) -> None:
        self._llm = llm
        self.policy = policy
        self._core = StepBatch(
            llm.engine,
            max_rows=max_rows,
            max_len=max_len,
            prefill_tokens=prefill_tokens,
            plans=llm.draft_plans,
        )
        self._live: dict[int, _Live] = {}

    # ------------------------------------------------------------ requests

    def submit(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        stop_ids: list[int] | None = None,
        logprobs: int | None = None,
        speculative: Any = None,
        chat: bool = False,
        n: int = 1,
        ignore_eos: bool = False,
    ) -> list[int]:
        """Queue ``n`` continuations of one prompt (a text or token ids); returns their
        request ids. They start at the next step that has a free row. A seed keys the
        ``n`` rows' random streams (one per copy), so each draws different text, reproducibly.
        ``stop_ids`` add to the model's EOS; ``ignore_eos`` turns the EOS stop off."""
        request = self._llm._request(
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
            stop_ids,
            None,
            chat,
            logprobs=logprobs,
            speculative=speculative,
            ignore_eos=ignore_eos,
        )
        if len(request.prompts) != 1:
            raise InvalidArgument("submit takes one prompt; call it once per prompt")
        return self.add(request, copies=n)

    def add(self, request: Request, copies: int = 1) -> list[int]:
        """Queue an already checked request: each prompt ``copies`` times."""
        check_drafting(self.policy, request.speculative)
        specs = [
            RowSpec(
                tuple(prompt),
                request.max_new_tokens,
                request.sampling,
                request.stop_ids,
                request.logprobs,
                request.speculative,
                draw_index=index,
            )
            for index, prompt in enumerate(
                prompt for prompt in request.prompts for _ in range(copies)
            )
        ]
        for spec in specs:
            error = self._core.fit_error(spec)
            if error is not None:
                raise InvalidArgument(f"{error}; shorten the prompt or lower max_new_tokens")
        ids = []
        with self._llm._lock:
            for spec in specs:
                row_id = self._core.admit(spec)
                row = self._core.row(row_id)
                stream = None
                if self._llm.tokenizer is not None:
                    stream = TextStream(self._llm.tokenizer, request.stop)
                self._live[row_id] = _Live(row, stream, list(spec.prompt))
                ids.append(row_id)
        return ids

    def cancel(self, request: int) -> None:
        """Stop a request now and free its rows (a client that went away)."""
        with self._llm._lock:
            if self._live.pop(request, None) is not None:
                self._core.finish(request, "cancelled")

    # ------------------------------------------------------------ stepping

    @property
    def has_work(self) -> bool:
        return self._core.has_work

    @property
    def active_rows(self) -> int:
        return self._core.active_rows

    @property
    def waiting_rows(self) -> int:
        return self._core.waiting_rows

    @property
    def stats(self) -> StepStats:
        return self._core.stats

    def step(self) -> list[BatchEvent]:
        """One step (a prefill chunk and/or one decode forward); what each request got."""
        llm = self._llm
        with llm._lock, llm._checked_weights():
            llm._activate(self.policy)
            events = self._core.step()
            now = time.perf_counter()
            out = [self._event(event, now) for event in events if event.row in self._live]
        return out

    def _event(self, event, now: float) -> BatchEvent:
        live = self._live[event.row]
        if live.first_token_at is None and event.tokens:
            live.first_token_at = now
        stream = live.stream
        text, kept = "", []
        for token in event.tokens:
            kept.append(token)
            if stream is not None:
                text += stream.add(token)
                if stream.stopped:
                    break
        live.tokens.extend(kept)
        reason = event.finish_reason
        if stream is not None and stream.stopped:
            if reason is None:
                self._core.finish(event.row, "stop")
            reason = "stop"
        out = BatchEvent(
            request=event.row,
            text=text,
            token_ids=kept,
            logprobs=None if event.logprobs is None else event.logprobs[: len(kept)],
            top_logprobs=None if event.top is None else event.top[: len(kept)],
            finish_reason=reason,
        )
        if reason is not None:
            del self._live[event.row]
            if stream is not None:
                out.text += stream.finish()
            out.completion = Completion(
                text=stream.text if stream is not None else "",
                token_ids=list(live.tokens),
                finish_reason=reason,
                prompt_token_ids=live.prompt,
            )
            out.flops, out.dense_flops = live.row.flops, live.row.dense_flops
            out.first_token_seconds = (live.first_token_at or now) - live.submitted
        return out


def open_batch(
    llm: LLM,
    *,
    max_rows: int,
    max_len: int,
    prefill_tokens: int,
    policy: PolicySpec,
) -> Batch:
    """``LLM.open_batch``'s checks and construction."""
    max_rows, max_len = count("max_rows", max_rows), count("max_len", max_len)
    prefill_tokens = count("prefill_tokens", prefill_tokens)
    positions = llm.config.max_position_embeddings
    if max_len > positions:
        raise InvalidArgument(
            f"max_len {max_len} is more than the model's {positions} positions; lower it"
        )
    chosen = None if policy is None else llm._policy(policy)
    return Batch(
        llm,
        max_rows=max_rows,
        max_len=max_len,
        prefill_tokens=prefill_tokens,
        policy=chosen if chosen is not None else llm._scoped_policy(),
    )
