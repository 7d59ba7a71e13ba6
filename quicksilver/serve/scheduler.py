"""The bounded queue and the one worker thread that drives the model.

HTTP handlers only queue ``Job``s and wait for their events. The worker takes every request
that arrived since its last step into the running batches (continuous batching: a new
request starts at the next step, a finished or abandoned one leaves at once) and runs one
step. The queue is bounded: a full queue refuses at once (503 with Retry-After) instead of
building a backlog nobody will wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import quicksilver as qs
from quicksilver.serve.errors import APIError, internal_error
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

    @property
    def rows(self) -> int:
        return self.spec.rows

    def emit(self, event: tuple[Any, ...]) -> None:
        # A closed loop (the server shutting down) has nobody left to tell.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    """Queue jobs; one worker thread admits them into the running batches at the next step
    and steps the batches (``StepRunner``), so a request never waits for another to end.

    ``runner`` needs ``admit(job)``, ``step()``, ``has_work``, ``waiting_rows`` and
    ``close()``; a job's rows that wait for a free cache row count against ``max_queue``
    like jobs not yet admitted, so a full server refuses at once (503 with Retry-After).
    """

    def __init__(
        self,
        runner: Any,
        *,
        max_queue: int,
        retry_after: int = 1,
    ) -> None:
        self.runner = runner
        self.max_queue = max_queue
        self.retry_after = retry_after
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._waiting_rows = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ the handlers' side

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise APIError("the server is shutting down", 503)
            self._purge()
            if self.queued >= self.max_queue:
                raise APIError(
                    f"the server is busy ({self.queued} requests waiting); retry shortly",
                    503,
                    headers={"Retry-After": str(self.retry_after)},
                )
            self._pending.append(job)
            self._cond.notify()

    @property
    def queued(self) -> int:
        """Requests not yet admitted plus admitted rows still waiting for a cache row (as
        the worker last counted them: the runner's tables are the worker's alone, and
        reading them from a handler's thread while the worker changes them would race)."""
        return len(self._pending) + self._waiting_rows

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
            if self._thread.is_alive():
                return  # still inside a step: the batches are the worker's until it ends
        self.runner.close()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self.runner.has_work and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                self._purge()
                arrived = list(self._pending)
                self._pending.clear()
                self._running = [j for j in self._running if not j.done] + arrived
            try:
                now = time.perf_counter()
                for job in arrived:
                    job.started = now
                    self.runner.admit(job)
                self._waiting_rows = self.runner.waiting_rows
                self.runner.step()
            except Exception as err:  # a bug no job owns: fail the running jobs, keep serving
                for job in self._running:
                    if not job.done:
                        job.done = True
                        job.emit(("error", internal_error(err)))
                self.runner.reset()
            self._waiting_rows = self.runner.waiting_rows
            self._running = [j for j in self._running if not j.done]

    def _purge(self) -> None:
        """Drop waiting jobs whose clients went away: they free their place at once."""
        for job in [j for j in self._pending if j.cancelled.is_set()]:
            self._pending.remove(job)
            job.done = True
