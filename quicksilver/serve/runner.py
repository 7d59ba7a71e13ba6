"""One batch on the worker thread: generate every row of its jobs together, score the rows
that asked for log-probs, and split what the batch cost among its jobs.

Generation drives ``Engine.start`` step by step (as ``LLM.stream`` does) so that each row
can have its own token limit and stop strings, streamed text reaches its client as soon as
it is final, and a row whose client went away stops at the next step. Log-probs come from one
teacher-forced forward over prompt + generated tokens under the same policy
(``quicksilver.scoring``): prompt tokens need it anyway for ``echo``, and the generation loop
does not keep the distributions it sampled from.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import quicksilver as qs
from quicksilver.accounting import causal_pairs, dense_flops
from quicksilver.errors import QuicksilverError
from quicksilver.scoring import dense_scoring_flops, score_tokens
from quicksilver.serve.errors import APIError
from quicksilver.serve.metrics import Metrics
from quicksilver.serve.scheduler import ChoiceResult, Job, JobResult
from quicksilver.text import TextStream


class _Row:
    """One choice of one job inside the batch."""

    def __init__(self, job: Job, prompt_index: int, choice: int, prompt: list[int]) -> None:
        self.job, self.prompt_index, self.choice, self.prompt = job, prompt_index, choice, prompt
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason = "length"
        self.first_piece_at: float | None = None


class BatchRunner:
    """``run_batch`` for the scheduler, bound to the model and the server's metrics."""

    def __init__(self, llm: qs.LLM, metrics: Metrics) -> None:
        self.llm = llm
        self.metrics = metrics
        # The policy stays set between batches: preparing one (e.g. quantising weights for
        # Matryoshka) costs more than a batch, so it changes only when a batch needs another.
        self._policy_key: str | None = None
        self._policy_scope = contextlib.ExitStack()

    def _use(self, policy: qs.Policy | None) -> None:
        key = json.dumps(policy.to_config() if policy is not None else {}, sort_keys=True)
        if key != self._policy_key:
            self._policy_scope.close()
            self._policy_key = None
            self._policy_scope.enter_context(self.llm.use(policy))
            self._policy_key = key

    def close(self) -> None:
        """Release the policy in use (the model goes back to dense)."""
        self._policy_scope.close()
        self._policy_key = None

    def __call__(self, jobs: list[Job]) -> None:
        counter = self.llm.engine.counter
        rows = [
            _Row(job, p, p * job.spec.n + j, prompt)
            for job in jobs
            for p, prompt in enumerate(job.spec.prompts)
            for j in range(job.spec.n)
        ]
        before = counter.summary()
        self._batch_dense = 0
        timings = {"prefill_s": 0.0, "decode_s": 0.0, "scoring_s": 0.0}
        try:
            self._use(jobs[0].policy)
            generating = [r for r in rows if r.job.spec.max_tokens > 0]
            if generating:
                self._generate(generating, timings)
            start = time.perf_counter()
            scores = self._score([r for r in rows if r.job.spec.logprobs is not None])
            timings["scoring_s"] = time.perf_counter() - start
        except QuicksilverError as err:
            for job in jobs:
                job.done = True
                job.emit(("error", APIError(str(err), 400)))
            return
        spent = counter.since(before)
        self._finish(jobs, rows, scores, spent, timings)

    # ------------------------------------------------------------ generation

    def _generate(self, rows: list[_Row], timings: dict[str, float]) -> None:
        llm = self.llm
        spec = rows[0].job.spec
        generation = llm.engine.start(
            [r.prompt for r in rows], max(r.job.spec.max_tokens for r in rows), spec.sampling
        )
        streams = [TextStream(llm.tokenizer, r.job.spec.stop) for r in rows]
        for new in generation:
            for i, token in new:
                row, stream = rows[i], streams[i]
                piece = stream.add(token)
                if stream.stopped:
                    generation.finish(i)
                elif len(generation.tokens[i]) >= row.job.spec.max_tokens:
                    generation.finish(i, "length")
                self._send(row, piece)
            for i, row in enumerate(rows):
                if row.job.cancelled.is_set():
                    generation.finish(i, "cancelled")
        for i, (row, stream) in enumerate(zip(rows, streams, strict=True)):
            self._send(row, stream.finish())
            row.tokens = list(generation.tokens[i])
            row.text = stream.text
            reason = generation.finish_reasons[i] or "stop"
            row.finish_reason = "stop" if stream.stopped else reason
        result = generation.result()
        timings["prefill_s"] = result.prefill_seconds
        timings["decode_s"] = result.decode_seconds
        self._batch_dense += _dense_generation(
            [len(r.prompt) for r in rows], result.decode_steps, llm.config
        )

    def _send(self, row: _Row, piece: str) -> None:
        if not piece or not row.job.spec.stream or row.job.cancelled.is_set():
            return
        if row.first_piece_at is None:
            row.first_piece_at = time.perf_counter()
            self.metrics.time_to_first_token(row.first_piece_at - row.job.created)
        row.job.emit(("text", row.choice, piece))

    # ------------------------------------------------------------ log-probs

    def _score(self, rows: list[_Row]) -> dict[int, Any]:
        """TokenScores per row (by id) for the rows that asked for log-probs."""
        wanted = []
        for row in rows:
            sequence = row.prompt + row.tokens
            first = 1 if row.job.spec.echo else len(row.prompt)
            if first < len(sequence):
                wanted.append((row, sequence, first))
        if not wanted:
            return {}
        top = max(row.job.spec.logprobs or 0 for row, _, _ in wanted)
        sequences, firsts = [s for _, s, _ in wanted], [f for _, _, f in wanted]
        scored = score_tokens(self.llm.engine, sequences, firsts, top=top)
        self._batch_dense += dense_scoring_flops(self.llm.config, sequences, firsts)
        return {id(row): s for (row, _, _), s in zip(wanted, scored, strict=True)}

    # ------------------------------------------------------------ results and cost

    def _dense_cost(self, row: _Row) -> tuple[int, int]:
        """(dense FLOPs, tokens fed) of this row alone, without padding: its prompt and every
        generated token but the last go through the model once; one head per new token; plus
        the scoring forward when log-probs were asked. Only used to split the batch's cost."""
        config = self.llm.config
        window = config.sliding_window
        flops = fed = 0
        if row.job.spec.max_tokens > 0:
            n = len(row.prompt) + max(len(row.tokens), 1) - 1
            flops += dense_flops(config, n, causal_pairs(n, window), max(len(row.tokens), 1))
            fed += n
        if row.job.spec.logprobs is not None:
            n = len(row.prompt) + len(row.tokens) - 1
            first = 1 if row.job.spec.echo else len(row.prompt)
            if n > 0 and first <= n:
                flops += dense_flops(config, n, causal_pairs(n, window), n - first + 1)
                fed += n
        return flops, fed

    def _finish(
        self,
        jobs: list[Job],
        rows: list[_Row],
        scores: dict[int, Any],
        spent: dict[str, int],
        timings: dict[str, float],
    ) -> None:
        """The batch's counted FLOPs and the dense FLOPs of the same forwards (padding and
        finished rows that rode along included: that work ran, and a dense run would do it
        too) are split among its jobs in proportion to the dense cost of their own rows, so
        every job of a batch reports the batch's FLOP fraction of dense."""
        costs = {id(row): self._dense_cost(row) for row in rows}
        own_total = sum(c for c, _ in costs.values()) or 1
        batch_dense = self._batch_dense or own_total
        fed = sum(f for _, f in costs.values())
        layers = self.llm.config.n_layers
        self.metrics.batch(len(rows))
        self.metrics.add(
            counted_flops=spent["total"],
            dense_flops=batch_dense,
            processed_tokens=fed,
            layer_token_rows=spent["layer_tokens"],
            dense_layer_token_rows=layers * fed,
            halted_kv_token_rows=spent["kv_only_tokens"],
        )
        config = self.llm.engine.policy.to_config() if self.llm.engine.policy else {}
        for job in jobs:
            mine = [r for r in rows if r.job is job]
            weight = sum(costs[id(r)][0] for r in mine) / own_total
            share, dense = spent["total"] * weight, batch_dense * weight
            completion_tokens = sum(len(r.tokens) for r in mine)
            self.metrics.add(
                prompt_tokens=sum(map(len, job.spec.prompts)), generation_tokens=completion_tokens
            )
            now = time.perf_counter()
            result = JobResult(
                choices=[
                    ChoiceResult(
                        index=r.choice,
                        prompt_index=r.prompt_index,
                        text=r.text,
                        token_ids=r.tokens,
                        finish_reason=r.finish_reason,
                        scores=scores.get(id(r)),
                        scored_ids=r.prompt + r.tokens,
                    )
                    for r in sorted(mine, key=lambda r: r.choice)
                ],
                prompt_tokens=sum(map(len, job.spec.prompts)),
                completion_tokens=completion_tokens,
                quicksilver={
                    "policy": config,
                    "flops": round(share),
                    "dense_flops": round(dense),
                    "flop_fraction": share / dense if dense else 1.0,
                    "batch_rows": len(rows),
                    "batch_requests": len(jobs),
                    "timings": {
                        "queue_s": (job.started or now) - job.created,
                        **timings,
                        "total_s": now - job.created,
                    },
                },
            )
            job.done = True
            job.emit(("end", result))


def _dense_generation(prompts: list[int], decode_steps: int, config: Any) -> int:
    """What the dense engine counts for a generation batch of these prompt lengths: the
    left-padded prompt block (a padding query reads only its own slot), then every row feeds
    one token per decode step, reading its real tokens so far."""
    rows, longest = len(prompts), max(prompts)
    window = config.sliding_window
    pairs = sum(causal_pairs(p, window) + longest - p for p in prompts)
    pairs += sum(min(p + s, window or p + s) for p in prompts for s in range(1, decode_steps + 1))
    n_tokens = rows * (longest + decode_steps)
    return dense_flops(config, n_tokens, pairs, rows * (1 + decode_steps))
