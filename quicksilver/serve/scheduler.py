"""The bounded queue and the one worker thread that owns the model.

An ``LLM`` is not thread-safe (its policy is the engine's state), so exactly one thread runs
it: HTTP handlers only queue ``Job``s and wait for their events. While a batch runs, new
requests wait in the queue; the next batch takes the oldest waiting request and every later
one that is compatible with it (same policy and sampling, rows and context within limits),
so a burst of requests costs a few batched forwards instead of one generation each. The
queue is bounded: a full queue refuses at once (503 with Retry-After) instead of building a
backlog nobody will wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import quicksilver as qs
from quicksilver.serve.errors import APIError
from quicksilver.serve.protocol import GenerationSpec

_ids = itertools.count()


@dataclass
class ChoiceResult:
    """One finished choice (a prompt's n-th continuation)."""

    index: int
    prompt_index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    scores: Any = None  # scoring.TokenScores when logprobs were asked, else None
    scored_ids: list[int] = field(default_factory=list)  # the tokens `scores` covers


@dataclass
class JobResult:
    choices: list[ChoiceResult]
    prompt_tokens: int
    completion_tokens: int
    quicksilver: dict[str, Any]


class Job:
    """One request on its way through the queue and the worker.

    The worker reports through ``emit`` (thread-safe: it schedules the put on the handler's
    event loop): ``("text", choice, piece)`` while streaming, then ``("end", JobResult)`` or
    ``("error", APIError)``. ``cancel`` (a client that went away) makes the worker drop the
    job's rows at its next step.
    """

    def __init__(
        self, spec: GenerationSpec, policy: qs.Policy | None, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.id = next(_ids)
        self.spec = spec
        self.policy = policy
        self.loop = loop
        self.events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.created = time.perf_counter()
        self.started: float | None = None
        self.done = False
        self.key = self._key()

    @property
    def rows(self) -> int:
        return self.spec.rows

    def _key(self) -> str:
        """Jobs with equal keys can share a batch: the engine runs one policy and one
        sampling configuration (one random generator) per batch. A seeded sampled request
        batches only with itself, so its seed reproduces its text whatever else is queued."""
        spec = self.spec
        policy = json.dumps(self.policy.to_config() if self.policy else {}, sort_keys=True)
        sampling = spec.sampling
        if spec.max_tokens == 0:
            how = "score"
        elif sampling.temperature == 0:
            how = "greedy"
        elif sampling.seed is not None:
            how = f"seeded-{self.id}"
        else:
            how = f"{sampling.temperature}/{sampling.top_k}/{sampling.top_p}"
        return f"{policy}|{how}"

    def emit(self, event: tuple[Any, ...]) -> None:
        # A closed loop (the server shutting down) has nobody left to tell.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    """Queue jobs; a worker thread runs them in batches through ``run_batch``.

    ``run_batch(jobs)`` must emit each job's final event; an exception it raises becomes a
    500 for every job of that batch, and the worker goes on with the next batch.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Job]], None],
        *,
        max_rows: int,
        max_queue: int,
        positions: int,
        retry_after: int = 1,
    ) -> None:
        self.run_batch = run_batch
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.positions = positions
        self.retry_after = retry_after
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ the handlers' side

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise APIError("the server is shutting down", 503)
            self._purge()
            if len(self._pending) >= self.max_queue:
                raise APIError(
                    f"the server is busy ({len(self._pending)} requests waiting); retry shortly",
                    503,
                    headers={"Retry-After": str(self.retry_after)},
                )
            self._pending.append(job)
            self._cond.notify()

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return sum(1 for j in list(self._running) if not j.done and not j.cancelled.is_set())

    # ------------------------------------------------------------ the worker

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="quicksilver-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in self._pending:
                job.emit(("error", APIError("the server is shutting down", 503)))
            self._pending.clear()
            for job in self._running:
                job.cancel()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                batch = self._take()
                self._running = batch
            if batch:
                now = time.perf_counter()
                for job in batch:
                    job.started = now
                try:
                    self.run_batch(batch)
                except Exception as err:  # a bug: fail this batch, keep serving
                    failure = APIError(f"internal error: {type(err).__name__}: {err}", 500)
                    for job in batch:
                        if not job.done:
                            job.done = True
                            job.emit(("error", failure))
            with self._cond:
                self._running = []

    def _purge(self) -> None:
        """Drop waiting jobs whose clients went away: they free their place at once."""
        for job in [j for j in self._pending if j.cancelled.is_set()]:
            self._pending.remove(job)
            job.done = True

    def _take(self) -> list[Job]:
        """The oldest live job and the later compatible ones that fit beside it."""
        self._purge()
        if not self._pending:
            return []
        first = self._pending[0]
        batch, rows = [first], first.rows
        longest = max(map(len, first.spec.prompts))
        new = first.spec.max_tokens
        for job in list(self._pending)[1:]:
            if job.cancelled.is_set() or job.key != first.key:
                continue
            job_longest = max(longest, *map(len, job.spec.prompts))
            job_new = max(new, job.spec.max_tokens)
            if rows + job.rows > self.max_rows or job_longest + job_new - 1 > self.positions:
                continue
            batch.append(job)
            rows, longest, new = rows + job.rows, job_longest, job_new
        for job in batch:
            self._pending.remove(job)
        return batch
