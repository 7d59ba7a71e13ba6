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
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Literal, Unpack

from quicksilver.api.arguments import PolicySpec, Prompt, check_drafting, count
from quicksilver.api.options import (
    GenerationOptions,
    OptionKeywords,
    options_from,
    speculative_option,
)
from quicksilver.api.records import BatchEvent, Completion, GenerationOutput, speculative_record
from quicksilver.api.requests import Request
from quicksilver.errors import InvalidArgument
from quicksilver.policies import Policy
from quicksilver.runtime.batch import StepBatch
from quicksilver.runtime.cache import room_for, sequence_fit_error
from quicksilver.runtime.rows import Row, RowSpec, StepStats
from quicksilver.runtime.speculative import SpeculativeConfig
from quicksilver.text import TextStream

if TYPE_CHECKING:
    from quicksilver.api.llm import LLM


def chosen_drafting(
    asked: SpeculativeConfig | Literal[False] | None, default: SpeculativeConfig | None
) -> SpeculativeConfig | None:
    """The drafting a request runs with: its own, else the default (False: none)."""
    if asked is False:
        return None
    return asked if asked is not None else default


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
    """Continuous batching on one ``LLM`` under one policy (see the module docstring).
    ``speculative`` is the drafting of requests whose options name none."""

    def __init__(
        self,
        llm: LLM,
        *,
        max_rows: int,
        max_len: int,
        prefill_tokens: int,
        policy: Policy | None,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        self._llm = llm
        self.policy = policy
        self.speculative = speculative
        self.max_len = max_len
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
        options: GenerationOptions | None = None,
        *,
        chat: bool = False,
        **keywords: Unpack[OptionKeywords],
    ) -> list[int]:
        """Queue ``options.n`` continuations of one prompt (a text or token ids); returns
        their request ids. They start at the next step that has a free row. ``options``
        or the keywords of ``GenerationOptions.build`` (not both) say how to generate;
        ``chat`` wraps a text prompt in the tokenizer's chat template."""
        options = options_from(options, keywords)
        request = self._llm.inputs.request(prompt, options, chat)
        if len(request.prompts) != 1:
            raise InvalidArgument("submit takes one prompt; call it once per prompt")
        return self.add(request)

    def add(self, request: Request) -> list[int]:
        """Queue an already checked request: each prompt ``options.n`` times. Whether it
        can run here is checked once, before any row is queued."""
        options = request.options
        speculative = self.drafting_for(options)
        check_drafting(self.policy, speculative)
        self._check_fit(request)
        tokenizer = self._llm.tokenizer
        ids = []
        with self._llm.access.lock:
            for prompt in request.prompts:
                for _ in range(options.n):
                    spec = RowSpec(
                        prompt,
                        options.max_new_tokens,
                        options.sampling,
                        request.stop_ids,
                        options.logprobs,
                        speculative,
                        # the row's index in the request keys its random stream with the
                        # seed, so copies of one prompt draw different text, reproducibly
                        draw_index=len(ids),
                    )
                    row_id = self._core.admit(spec)
                    row = self._core.row(row_id)
                    stream = None if tokenizer is None else TextStream(tokenizer, options.stop)
                    self._live[row_id] = _Live(row, stream, list(prompt))
                    ids.append(row_id)
        return ids

    def drafting_for(self, options: GenerationOptions) -> SpeculativeConfig | None:
        """The drafting a request with ``options`` runs with here."""
        return chosen_drafting(options.speculative, self.speculative)

    def _check_fit(self, request: Request) -> None:
        """The one fit rule (``sequence_fit_error``) for the longest prompt: every copy and
        every shorter prompt of the request fits when it does."""
        positions = self._llm.config.max_position_embeddings
        room = (
            f"the model's {positions}"
            if self.max_len >= positions
            else f"the {self.max_len} this batch holds"
        )
        error = sequence_fit_error(
            request.longest, request.options.max_new_tokens, self.max_len, room
        )
        if error is not None:
            raise InvalidArgument(f"{error}; shorten the prompt or lower max_new_tokens")

    def cancel(self, request: int) -> None:
        """Stop a request now and free its rows (a client that went away)."""
        with self._llm.access.lock:
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
        with self._llm.access.hold(self.policy):
            events = self._core.step()
            now = time.perf_counter()
            out = [self._event(event, now) for event in events if event.row in self._live]
        return out

    def run(self, request: Request) -> Generator[tuple[int, str], None, GenerationOutput]:
        """Queue ``request`` now (so every check happens now) and return the generator
        that steps until its rows end: it yields (row index, text piece) as pieces become
        final and returns the GenerationOutput of this batch's work. The one driver of
        ``LLM.generate`` and ``LLM.stream``."""
        return self._drive(self.add(request), self.drafting_for(request.options))

    def _drive(
        self, ids: list[int], speculative: SpeculativeConfig | None
    ) -> Generator[tuple[int, str], None, GenerationOutput]:
        """``run``'s loop. Left early, the requests are cancelled; at the end the call's
        policy is released."""
        index = {request_id: i for i, request_id in enumerate(ids)}
        completions: list[Any] = [None] * len(ids)
        try:
            while self.has_work:
                for event in self.step():
                    row = index[event.request]
                    if event.completion is not None:
                        completions[row] = event.completion
                    if event.text:
                        yield row, event.text
        finally:
            for request_id in ids:  # a stream left early frees its rows
                self.cancel(request_id)
            self._llm.access.release()
        stats = self.stats
        return GenerationOutput(
            completions=completions,
            prefill_seconds=stats.prefill_seconds,
            decode_seconds=stats.decode_seconds,
            decode_steps=stats.decode_steps,
            decode_tokens_per_s=stats.decode_tokens / stats.decode_seconds
            if stats.decode_seconds
            else 0.0,
            flops=dict(stats.flops),
            decode_flops=dict(stats.decode_flops),
            policy=self.policy.to_config() if self.policy is not None else {},
            compile_seconds=stats.compile_seconds,
            fed_tokens=stats.fed_tokens,
            speculative=speculative_record(speculative, stats),
        )

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
    speculative: Any,
) -> Batch:
    """``LLM.open_batch``'s checks and construction."""
    max_rows, max_len = count("max_rows", max_rows), count("max_len", max_len)
    prefill_tokens = count("prefill_tokens", prefill_tokens)
    positions = llm.config.max_position_embeddings
    if max_len > positions:
        raise InvalidArgument(
            f"max_len {max_len} is more than the model's {positions} positions; lower it"
        )
    return Batch(
        llm,
        max_rows=max_rows,
        max_len=max_len,
        prefill_tokens=prefill_tokens,
        policy=llm.access.chosen_policy(policy),
        speculative=chosen_drafting(speculative_option(speculative), llm.speculative),
    )


def one_request_batch(llm: LLM, request: Request, policy: Policy | None) -> Batch:
    """A batch that holds exactly one request's rows, all prompts read in one step (a
    left-padded block): what ``LLM.generate`` and ``LLM.stream`` run in. Its room is what
    the request needs, at most the model's positions, so ``add`` refuses what cannot fit."""
    options = request.options
    rows = len(request.prompts) * options.n
    needed = request.longest + options.max_new_tokens - 1
    speculative = chosen_drafting(options.speculative, llm.speculative)
    return Batch(
        llm,
        max_rows=rows,
        max_len=min(
            room_for(llm.config, needed, speculative.max_tokens if speculative else 0),
            llm.config.max_position_embeddings,
        ),
        prefill_tokens=rows * request.longest,
        policy=policy,
        speculative=llm.speculative,
    )
