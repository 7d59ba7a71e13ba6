"""No request can stall the others: clients that hang up (plain or streamed, during prefill
or mid-generation) free their rows within a step, and a failure that belongs to one job
fails that job alone.

Every server here runs the tiny random Llama of ``tiny_models`` on 127.0.0.1 at a free port;
answers are compared with the same model called through the Python API.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tiny_models import MAX_POSITIONS, save_tiny_chat_llama  # noqa: E402

import quicksilver as qs  # noqa: E402
from quicksilver.serve.app import Settings  # noqa: E402
from quicksilver.serve.metrics import Metrics  # noqa: E402
from quicksilver.serve.runner import StepRunner  # noqa: E402
from quicksilver.serve.scheduler import Scheduler  # noqa: E402
from quicksilver.serve.server import BackgroundServer  # noqa: E402

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 2  # 90 bytes: 91 tokens
PROMPTS = ["abc abc abc abc", "Hello there", LONG_PROMPT, "One two three four five six"]
HALTING = {"halting": {"relative_drift": 10.0, "min_layer": 1}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_chat_llama(tmp_path_factory.mktemp("drops") / "tiny")


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> qs.LLM:
    return qs.load(str(model_dir), dtype="float32")


class PacedRunner(StepRunner):
    """Each step takes at least ``delay`` seconds, so a request that is not cancelled
    visibly keeps the worker busy."""

    def __init__(self, llm: qs.LLM, delay: float, **kwargs) -> None:
        super().__init__(llm, Metrics(), **kwargs)
        self.delay = delay

    def step(self) -> None:
        time.sleep(self.delay)
        super().step()


def start(model_dir: Path, runner_delay: float = 0.0, **settings) -> BackgroundServer:
    llm = qs.load(str(model_dir), dtype="float32")
    config = Settings(model_name="tiny", **settings)
    runner = PacedRunner(
        llm,
        runner_delay,
        max_rows=config.max_batch_size,
        max_len=config.max_context,
        prefill_tokens=config.prefill_tokens,
    )
    return BackgroundServer(llm, config, Scheduler(runner, max_queue=config.max_queue))


def raw_request(body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Connection: close\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


def server_errors(server: BackgroundServer) -> dict[str, float]:
    """Responses >= 500 by status, as /metrics counted them (dropped requests included)."""
    text = httpx.get(server.url + "/metrics").text
    found = re.findall(r'^\S*requests_total\{[^}]*code="(5\d\d)"[^}]*\} (\S+)', text, re.M)
    return {code: float(n) for code, n in found if float(n)}


def wait_until_idle(server: BackgroundServer, seconds: float) -> float:
    """Seconds until the worker holds no job and no row, failing after ``seconds``."""
    scheduler, started = server.app.state.server.scheduler, time.monotonic()
    while scheduler.running or scheduler.queued or scheduler.runner.has_work:
        assert time.monotonic() - started < seconds, "rows of departed clients still run"
        time.sleep(0.01)
    return time.monotonic() - started


# ---------------------------------------------------------------- plain requests


def test_plain_requests_whose_clients_hang_up_are_cancelled(model_dir: Path) -> None:
    """Twenty plain requests with long prompts and the longest generation that fits, their
    clients gone after 0.2 s: the worker is idle within a second (uncancelled, they would
    run 20 x 128 paced steps) and the next request is answered at once."""
    with start(model_dir, runner_delay=0.01, prefill_tokens=16, max_batch_size=4) as server:
        body = {"prompt": LONG_PROMPT, "max_tokens": MAX_POSITIONS - 91, "temperature": 0}
        clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
        for client in clients:
            client.sendall(raw_request(body))
        time.sleep(0.2)
        for client in clients:
            client.close()
        assert wait_until_idle(server, 1.0) < 1.0
        started = time.monotonic()
        after = httpx.post(
            server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30
        )
        assert after.status_code == 200 and time.monotonic() - started < 1.0
        metrics = httpx.get(server.url + "/metrics").text
        assert 'code="499"' in metrics
        runner = server.app.state.server.scheduler.runner
        assert runner.metrics.counters["generation_tokens"] < 20 * body["max_tokens"] / 4
        assert not server_errors(server)


# ---------------------------------------------------------------- failures stay with their job


def test_a_failure_in_one_jobs_results_fails_that_job_alone(
    model_dir: Path, reference: qs.LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scoring one request's log-probs raises: it gets a 500; the requests beside it in the
    same batch are answered exactly, and so is the next one."""
    original = StepRunner._logprobs

    def faulty(self, group, running):
        if running.job.spec.logprobs == 3:
            raise RuntimeError("planted fault")
        return original(self, group, running)

    monkeypatch.setattr(StepRunner, "_logprobs", faulty)
    with start(model_dir, runner_delay=0.005) as server:
        bodies = [{"prompt": p, "max_tokens": 8, "temperature": 0} for p in PROMPTS]
        bodies[1] = {**bodies[1], "logprobs": 3}
        answers: dict[int, httpx.Response] = {}

        def ask(i: int) -> None:
            answers[i] = httpx.post(server.url + "/v1/completions", json=bodies[i], timeout=30)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert answers[1].status_code == 500
        assert "planted fault" in answers[1].json()["error"]["message"]
        for i in (0, 2, 3):
            assert answers[i].status_code == 200, answers[i].text
            expected = reference.generate(PROMPTS[i], max_new_tokens=8).text
            assert answers[i].json()["choices"][0]["text"] == expected
        assert any(answers[i].json()["quicksilver"]["batch_requests"] > 1 for i in (0, 2, 3))
        assert wait_until_idle(server, 2.0) < 2.0


def test_a_failed_step_fails_its_batch_and_the_next_request_works(
    model_dir: Path, reference: qs.LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared forward raises once: the requests in that batch get a 500, the batch is
    replaced, and the next request is answered exactly."""
    failures = iter([True])
    original = qs.Batch.step

    def fails_once(self):
        if next(failures, False):
            raise RuntimeError("planted forward fault")
        return original(self)

    monkeypatch.setattr(qs.Batch, "step", fails_once)
    with start(model_dir) as server:
        first = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi"}, timeout=30)
        assert first.status_code == 500 and "planted" in first.json()["error"]["message"]
        body = {"prompt": "Hello there", "max_tokens": 6, "temperature": 0}
        second = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert second.status_code == 200
        expected = reference.generate("Hello there", max_new_tokens=6).text
        assert second.json()["choices"][0]["text"] == expected


def test_a_job_refused_halfway_through_admission_leaves_no_rows(
    model_dir: Path, reference: qs.LLM
) -> None:
    """Two prompts, the second too long for the server's rows (though within the model's
    context): 400, no row of the first keeps running, and the requests after it work."""
    with start(model_dir, max_context=32) as server:
        body = {"prompt": ["Hi", "x" * 60], "max_tokens": 4, "temperature": 0}
        refused = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert refused.status_code == 400
        assert wait_until_idle(server, 1.0) < 1.0
        for prompt in PROMPTS[:2]:
            body = {"prompt": prompt, "max_tokens": 4, "temperature": 0}
            answer = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
            assert answer.status_code == 200, answer.text
            expected = reference.generate(prompt, max_new_tokens=4).text
            assert answer.json()["choices"][0]["text"] == expected
        assert not server_errors(server)


# ---------------------------------------------------------------- hundreds of drops


async def drop(port: int, body: dict, events_before_leaving: int, delay: float) -> None:
    """Send a request and hang up: after ``delay`` seconds (a plain request, or a streamed
    one during prefill) or after that many server-sent events."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw_request(body))
    await writer.drain()
    if body.get("stream") and events_before_leaving:
        seen = 0
        while seen < events_before_leaving:
            line = await asyncio.wait_for(reader.readline(), 30)
            if not line:
                break
            seen += line.startswith(b"data:")
    else:
        await asyncio.sleep(delay)
    writer.close()


async def complete(client: httpx.AsyncClient, body: dict) -> tuple[int, str]:
    """A request read to its end: its status and text (streamed pieces joined)."""
    if not body.get("stream"):
        response = await client.post("/v1/completions", json=body)
        text = response.json()["choices"][0]["text"] if response.status_code == 200 else ""
        return response.status_code, text
    pieces = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[len("data: ") :])
                assert "error" not in event, event
                pieces += [c["text"] for c in event["choices"]]
    return response.status_code, "".join(pieces)


def random_body(rng: random.Random) -> dict:
    body = {
        "prompt": rng.choice(PROMPTS),
        "max_tokens": rng.choice([4, 12, 24]),
        "temperature": 0,
        "stream": rng.random() < 0.5,
    }
    extra = rng.choice([None, {"speculative": "ngram"}, {"policy": HALTING}])
    if extra is not None:
        body["quicksilver"] = extra
    return body


async def mixed_load(server: BackgroundServer, requests: int, seed: int) -> list[tuple]:
    """``requests`` requests, 16 at a time, two in five abandoned at a random moment;
    returns (body, status, text) of each one read to its end."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(16)
    finished: list[tuple] = []
    limits = httpx.Limits(max_connections=32)

    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:

        async def one(body: dict, leave: bool, events: int, delay: float) -> None:
            async with gate:
                if leave:
                    await drop(server.port, body, events, delay)
                else:
                    finished.append((body, *await complete(client, body)))

        await asyncio.gather(
            *(
                one(random_body(rng), rng.random() < 0.4, rng.randint(0, 4), rng.random() * 0.05)
                for _ in range(requests)
            )
        )
    return finished


def test_hundreds_of_dropped_clients_never_disturb_the_others(
    model_dir: Path, reference: qs.LLM
) -> None:
    """300 requests (plain and streamed, dense, drafted and under a halting policy), two in
    five abandoned during prefill or mid-stream: every other one is answered 200 with the
    text the Python API gives, no response is ever a 5xx, and the worker ends idle."""
    with start(model_dir, prefill_tokens=16, max_batch_size=8) as server:
        finished = asyncio.run(mixed_load(server, 300, seed=7))
        assert wait_until_idle(server, 2.0) < 2.0
        assert not server_errors(server)
    statuses = Counter(status for _, status, _ in finished)
    assert statuses == {200: len(finished)} and len(finished) > 120, statuses
    expected: dict[tuple, str] = {}
    for body, _, text in finished:
        key = (body["prompt"], body["max_tokens"], json.dumps(body.get("quicksilver")))
        if key not in expected:
            policy = body.get("quicksilver", {}).get("policy")
            expected[key] = reference.generate(
                body["prompt"], max_new_tokens=body["max_tokens"], policy=policy
            ).text
        assert text == expected[key], body
