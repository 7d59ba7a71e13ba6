"""The worker's side of continuous batching: requests join running batches at the next step.

Each policy in use has its own ``qs.Batch`` (the public step handle): a request's rows (its
prompts times ``n``) are submitted to the batch of its policy as soon as the worker sees the
request, start at the next step that has a free row, stream their text as it becomes final,
and leave — freeing their rows — when they finish, stop or their client goes away. Seeded
sampled requests share batches: each row has its own random stream. When several policies
have work, the worker gives each a turn of ``quantum_s`` seconds in rotation, so no request
waits for another policy's requests to drain. Everything goes through the public API.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import quicksilver as qs
from quicksilver.errors import QuicksilverError
from quicksilver.scoring import TokenScores
from quicksilver.serve.errors import APIError, internal_error
from quicksilver.serve.metrics import Metrics
from quicksilver.serve.scheduler import ChoiceResult, Job, JobResult

# Seconds a policy's batch runs before another policy with work gets its turn.
DEFAULT_QUANTUM_S = 0.25


@dataclass
class _Choice:
    """One row of a job: a prompt's n-th continuation."""

    index: int
    prompt_index: int
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    flops: float = 0.0
    dense_flops: float = 0.0


@dataclass
class _Running:
    """A job inside a group's batch."""

    job: Job
    choices: dict[int, _Choice]  # request id in the batch -> choice
    batch_rows: int = 0  # the most rows its batch held while it ran
    batch_requests: int = 0  # the most requests its batch held while it ran
    first_text_at: float | None = None
    last_text_at: float | None = None
    flops: float = 0.0  # scoring forwards (echo), on top of its rows' shares
    dense_flops: float = 0.0


class _Group:
    """The batch of one policy and the jobs in it."""

    def __init__(self, key: str, batch: qs.Batch) -> None:
        self.key = key
        self.batch = batch
        self.jobs: dict[int, _Running] = {}  # job id -> job
        self.owner: dict[int, _Running] = {}  # request id -> job

    @property
    def has_work(self) -> bool:
        return bool(self.jobs)


class StepRunner:
    """Admits jobs, steps batches, dispatches events; used by the scheduler's worker only."""

    def __init__(
        self,
        llm: qs.LLM,
        metrics: Metrics,
        *,
        max_rows: int = 16,
        max_len: int | None = None,
        prefill_tokens: int = 512,
        quantum_s: float = DEFAULT_QUANTUM_S,
        speculative: Any = None,
    ) -> None:
        self.llm = llm
        self.speculative = speculative  # the server's default for requests that name none
        self.metrics = metrics
        self.max_rows = max_rows
        self.max_len = max_len or llm.config.max_position_embeddings
        self.prefill_tokens = prefill_tokens
        self.quantum_s = quantum_s
        self._groups: dict[str, _Group] = {}
        self._order: list[str] = []  # rotation of the groups
        self._turn: str | None = None
        self._turn_started = 0.0

    # ------------------------------------------------------------ admission

    @property
    def has_work(self) -> bool:
        return any(g.has_work for g in self._groups.values())

    @property
    def waiting_rows(self) -> int:
        """Rows admitted that wait for a cache row to free up (a row that will start at the
        next step because one is free does not count)."""
        return sum(
            max(0, g.batch.waiting_rows - (self.max_rows - g.batch.active_rows))
            for g in self._groups.values()
        )

    def admit(self, job: Job) -> None:
        """Put a job's rows into its policy's batch, or answer it at once (echo scoring only,
        or an error)."""
        spec = job.spec
        running, group = _Running(job, {}), None
        try:
            group = self._group(job.policy)
            if spec.score_only:  # echo + logprobs: score the prompts, generate nothing
                self._score_only(job, group)
                return
            for p, prompt in enumerate(spec.prompts):
                ids = group.batch.submit(prompt, spec.options)
                for j, request_id in enumerate(ids):
                    running.choices[request_id] = _Choice(p * spec.n + j, p, list(prompt))
                    group.owner[request_id] = running
            group.jobs[job.id] = running
        except Exception as err:
            if group is not None:  # admitted whole or not at all: earlier prompts' rows leave
                self._drop(group, running)
            refused = isinstance(err, QuicksilverError)
            self._fail(job, APIError(str(err), 400) if refused else internal_error(err))

    def _group(self, policy: qs.Policy | None) -> _Group:
        key = json.dumps(policy.to_config() if policy is not None else {}, sort_keys=True)
        group = self._groups.get(key)
        if group is None:
            batch = self.llm.open_batch(
                max_rows=self.max_rows,
                max_len=self.max_len,
                prefill_tokens=self.prefill_tokens,
                policy=policy,
                speculative=self.speculative,
            )
            group = self._groups[key] = _Group(key, batch)
            self._order.append(key)
        return group

    # ------------------------------------------------------------ stepping

    def step(self) -> None:
        """Drop what was cancelled, then one step of the group whose turn it is.

        A failure is charged to whom it belongs: an error while handling one job's events
        fails that job alone; only an error in the batch's shared step fails the batch's
        jobs, and the batch is replaced by a fresh one at the next request."""
        for group in self._groups.values():
            for running in [r for r in group.jobs.values() if r.job.cancelled.is_set()]:
                self._drop(group, running)
        group = self._next_group()
        if group is None:
            return
        try:
            events = self._step_batch(group)
        except Exception as err:
            self._fail_group(group, internal_error(err))
            return
        rows, requests = group.batch.active_rows, len(group.jobs)
        for running in group.jobs.values():
            running.batch_rows = max(running.batch_rows, rows)
            running.batch_requests = max(running.batch_requests, requests)
        now = time.perf_counter()
        for event in events:
            running = group.owner.get(event.request)
            if running is None:
                continue
            try:
                self._dispatch(group, running, event, now)
            except Exception as err:
                self._drop(group, running)
                self._fail(running.job, internal_error(err))
        if rows:
            self.metrics.batch(rows)
        self._drop_idle()

    def _step_batch(self, group: _Group) -> list[qs.BatchEvent]:
        """One step of the group's batch (the forward all its rows share), counted."""
        batch = group.batch
        stats = batch.stats
        before = dict(stats.flops)
        fed_before = stats.fed_tokens
        drafts_before = (stats.drafts, stats.draft_tokens, stats.accepted_tokens)
        events = batch.step()
        spent = {k: v - before.get(k, 0) for k, v in stats.flops.items()}
        self._count(spent, stats.fed_tokens - fed_before)
        drafts_after = (stats.drafts, stats.draft_tokens, stats.accepted_tokens)
        drafted = [after - ahead for after, ahead in zip(drafts_after, drafts_before, strict=True)]
        if drafted[0]:
            self.metrics.spec_decode(*drafted)
        return events

    def _fail_group(self, group: _Group, error: APIError) -> None:
        """The batch's step failed: its jobs fail, and the batch (whose rows and cache may
        be half-updated) goes; the next request of its policy opens a fresh one."""
        for running in list(group.jobs.values()):
            self._fail(running.job, error)
        del self._groups[group.key]
        self._order.remove(group.key)

    def _next_group(self) -> _Group | None:
        """Round robin over the groups with work, a turn lasting ``quantum_s``."""
        busy = [k for k in self._order if self._groups[k].has_work]
        if not busy:
            return None
        now = time.perf_counter()
        if self._turn in busy and now - self._turn_started < self.quantum_s:
            return self._groups[self._turn]
        later = []
        if self._turn in self._order:
            mine = self._order.index(self._turn)
            later = [k for k in busy if self._order.index(k) > mine]
        self._turn = (later or busy)[0]
        self._turn_started = now
        return self._groups[self._turn]

    def _drop_idle(self) -> None:
        """A policy's batch (and its KV cache) goes once it has no work; the default stays."""
        for key in [k for k, g in self._groups.items() if not g.has_work and k != "{}"]:
            del self._groups[key]
            self._order.remove(key)

    # ------------------------------------------------------------ events

    def _dispatch(self, group: _Group, running: _Running, event: qs.BatchEvent, now: float) -> None:
        choice = running.choices[event.request]
        choice.tokens += event.token_ids
        if event.logprobs is not None:
            choice.logprobs += event.logprobs
            choice.top += event.top_logprobs or []
        job = running.job
        # With logprobs, every step's tokens go out (a chunk's text may be held back, "").
        streamed = job.spec.logprobs is not None and event.token_ids
        if (event.text or streamed) and job.spec.stream and not job.cancelled.is_set():
            if event.text and running.first_text_at is None:
                running.first_text_at = now
                self.metrics.time_to_first_token(now - job.created)
            elif event.text and running.last_text_at:
                self.metrics.observe_inter_token(now - running.last_text_at)
            running.last_text_at = now if event.text else running.last_text_at
            scores = None
            if streamed:
                scores = (event.token_ids, event.logprobs or [], event.top_logprobs or [])
            job.emit(("text", choice.index, event.text, scores))
        if event.completion is None:
            return
        choice.text = event.completion.text
        choice.finish_reason = event.completion.finish_reason
        choice.flops, choice.dense_flops = event.flops, event.dense_flops
        del group.owner[event.request]
        if all(c.finish_reason is not None for c in running.choices.values()):
            del group.jobs[job.id]
            self._finish(group, running)

    def _drop(self, group: _Group, running: _Running) -> None:
        """A client went away: its rows leave the batch now."""
        for request_id, choice in running.choices.items():
            if choice.finish_reason is None:
                group.batch.cancel(request_id)
                group.owner.pop(request_id, None)
        group.jobs.pop(running.job.id, None)
        running.job.done = True

    def _fail(self, job: Job, error: APIError) -> None:
        job.done = True
        job.emit(("error", error))

    # ------------------------------------------------------------ results

    def _score_only(self, job: Job, group: _Group) -> None:
        running = _Running(job, {})
        spec = job.spec
        for p, prompt in enumerate(spec.prompts):
            for j in range(spec.n):
                running.choices[p * spec.n + j] = _Choice(
                    p * spec.n + j, p, list(prompt), finish_reason="length"
                )
        running.batch_rows, running.batch_requests = len(running.choices), 1
        self._finish(group, running)

    def _finish(self, group: _Group, running: _Running) -> None:
        job, spec = running.job, running.job.spec
        scores = self._logprobs(group, running)
        choices = sorted(running.choices.values(), key=lambda c: c.index)
        flops = running.flops + sum(c.flops for c in choices)
        dense = running.dense_flops + sum(c.dense_flops for c in choices)
        completion_tokens = sum(len(c.tokens) for c in choices)
        prompt_tokens = sum(map(len, spec.prompts))
        self.metrics.add(prompt_tokens=prompt_tokens, generation_tokens=completion_tokens)
        now = time.perf_counter()
        policy = group.batch.policy
        result = JobResult(
            choices=[
                ChoiceResult(
                    index=c.index,
                    prompt_index=c.prompt_index,
                    text=c.text,
                    token_ids=c.tokens,
                    finish_reason=c.finish_reason or "stop",
                    scores=scores.get(c.index),
                    scored_ids=c.prompt + c.tokens,
                )
                for c in choices
            ],
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            quicksilver={
                "policy": policy.to_config() if policy is not None else {},
                "flops": round(flops),
                "dense_flops": round(dense),
                "flop_fraction": flops / dense if dense else 1.0,
                "batch_rows": running.batch_rows,
                "batch_requests": running.batch_requests,
                "timings": {
                    "queue_s": (job.started or now) - job.created,
                    "first_token_s": (running.first_text_at or now) - job.created,
                    "total_s": now - job.created,
                },
            },
        )
        job.done = True
        job.emit(("end", result))

    def _logprobs(self, group: _Group, running: _Running) -> dict[int, TokenScores]:
        """Per choice: the sampler's log-probs of the generated tokens, after the prompt's
        from one teacher-forced forward when ``echo`` asks for them."""
        spec = running.job.spec
        if spec.logprobs is None:
            return {}
        prompt_scores: dict[int, TokenScores] = {}
        if spec.echo:
            wanted = [(p, prompt) for p, prompt in enumerate(spec.prompts) if len(prompt) > 1]
            if wanted:
                before = self.llm.counted_flops()
                scored = self.llm.token_scores(
                    [prompt for _, prompt in wanted], top=spec.logprobs, policy=group.batch.policy
                )
                after = self.llm.counted_flops()
                running.flops += after["total"] - before["total"]
                running.dense_flops += after["dense"] - before["dense"]
                self._count({k: after[k] - before[k] for k in after}, 0)
                prompt_scores = {p: s for (p, _), s in zip(wanted, scored, strict=True)}
        out = {}
        for choice in running.choices.values():
            head = prompt_scores.get(choice.prompt_index)
            first = len(choice.prompt) if not spec.echo else 1
            logprobs = (head.logprobs if head else []) + choice.logprobs
            top = (head.top if head else []) + choice.top
            greedy = (head.greedy if head else []) + [
                bool(alternatives) and alternatives[0][0] == token
                for token, alternatives in zip(choice.tokens, choice.top, strict=False)
            ]
            if spec.echo and head is None:
                first = len(choice.prompt)
            out[choice.index] = TokenScores(first=first, logprobs=logprobs, greedy=greedy, top=top)
        return out

    def _count(self, spent: dict[str, int], fed: int) -> None:
        if not spent:
            return
        layers = self.llm.config.n_layers
        self.metrics.add(
            counted_flops=spent.get("total", 0),
            dense_flops=spent.get("dense", 0),
            processed_tokens=fed,
            layer_token_rows=spent.get("layer_tokens", 0),
            dense_layer_token_rows=layers * fed,
            halted_kv_token_rows=spent.get("kv_only_tokens", 0),
        )

    def close(self) -> None:
        """Drop every batch (their KV caches) when the server stops."""
        self._groups.clear()
        self._order.clear()
        self._turn = None

    def reset(self) -> None:
        """After a failure inside a step: start again from empty batches."""
        self.close()
