"""Serving as users compare servers: ``quicksilver serve`` beside llama-cpp-python's server.

Both servers run as their own processes on 127.0.0.1 with the same GGUF file and the same
thread count, and get the same bounded scenarios, one server after the other:

1. ``concurrent``: C streaming clients send R requests of T tokens (closed loop).
2. ``poisson-X``: requests arrive at random (Poisson, X per second), mixed short and long
   prompts and 16-96 new tokens each, all streamed.
3. ``short-behind-long``: a 400-token stream starts; a second later an 8-token request is sent.
   Reported: the short one's time over the time the long one still needed (1.0 means it
   waited for the long one; a server that batches continuously answers in a few steps).

Per scenario: completion tokens per second of wall time, time to first token (TTFT) and the
time between streamed pieces (inter-token latency, ITL) at p50 / p99, errors. Our server runs
the ``concurrent`` scenario twice; its resident memory after each run shows whether it grows.
llama-cpp-python's server runs one request at a time; it is started with
``--interrupt_requests False`` (its default cuts a running stream when another arrives).

    .venv/bin/python benchmarks/serve_load.py                      # writes docs/benchmarks/serve.md
    .venv/bin/python benchmarks/serve_load.py --no-llama-cpp --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from local_server import free_port, rss_mib

ROOT = Path(__file__).resolve().parent.parent
TEXT = (
    "the history of the city begins with a small market by the river where traders from the "
    "north met farmers from the valley and over the centuries the market became a town"
)
WORDS = TEXT.split(" ")
SHORT_PROMPTS = [
    "The history of the city begins",
    "A short guide to growing tomatoes:",
    "In computer science, a cache is",
    "The best way to learn a language is",
    "Once upon a time, in a small village,",
    "The three laws of motion state that",
]


@dataclass
class Result:
    server: str
    scenario: str
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    note: str = ""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def long_prompt(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


# ---------------------------------------------------------------- one streamed request


async def stream_one(
    client: httpx.AsyncClient, result: Result, prompt: str, max_tokens: int
) -> tuple[float, float] | None:
    """Send one streamed completion; record TTFT, gaps and tokens. Returns (start, end)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    first = last = None
    pieces = 0
    result.requests += 1
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.errors += 1
                return None
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.errors += 1
                    return None
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        result.gaps.append(now - last)
                    last = now
                    pieces += 1
            if not done or first is None:
                result.errors += 1
                return None
    except httpx.HTTPError:
        result.errors += 1
        return None
    result.ttft.append(first - start)
    result.tokens += pieces  # one piece per token (ours may hold a piece back: a lower bound)
    return start, last


# ---------------------------------------------------------------- scenarios


async def concurrent(url: str, result: Result, clients: int, requests: int, tokens: int) -> None:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(f"{SHORT_PROMPTS[i % len(SHORT_PROMPTS)]} (request {i})")
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                await stream_one(client, result, queue.get_nowait(), tokens)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        result.seconds = time.perf_counter() - start


async def poisson(url: str, result: Result, rate: float, requests: int, seed: int) -> None:
    rng = random.Random(seed)
    plan = []
    at = 0.0
    for i in range(requests):
        at += rng.expovariate(rate)
        prompt = SHORT_PROMPTS[i % len(SHORT_PROMPTS)] if i % 3 else long_prompt(150, i)
        plan.append((at, prompt, rng.choice([16, 32, 64, 96])))
    limits = httpx.Limits(max_connections=requests)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        start = time.perf_counter()

        async def arrive(delay: float, prompt: str, tokens: int) -> None:
            await asyncio.sleep(delay)
            await stream_one(client, result, prompt, tokens)

        await asyncio.gather(*(arrive(*item) for item in plan))
        result.seconds = time.perf_counter() - start


async def short_behind_long(url: str, result: Result) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        long_task = asyncio.create_task(stream_one(client, result, "Tell me a long story.", 400))
        await asyncio.sleep(1.0)
        short = await stream_one(client, result, "Say hi:", 8)
        long = await long_task
    if short is None or long is None:
        result.note = "a request failed"
        return
    short_start, short_end = short
    still_needed = long[1] - short_start
    result.seconds = max(long[1], short_end) - long[0]
    result.note = (
        f"short took {short_end - short_start:.2f} s; the long one still needed "
        f"{still_needed:.2f} s: ratio {(short_end - short_start) / still_needed:.2f}"
    )


# ---------------------------------------------------------------- servers


class Server:
    def __init__(self, name: str, command: list[str], port: int, env: dict[str, str]) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )

    def wait_ready(self, path: str) -> None:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            code = self.process.poll()
            if code is not None:
                how = f"crashed ({signal.Signals(-code).name})" if code < 0 else f"exited ({code})"
                error = self.process.stderr.read().decode(errors="replace").strip().splitlines()
                last = f": {error[-1]}" if error else ""
                raise RuntimeError(f"{self.name} {how} before answering{last}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not answer within 10 minutes")
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def ours(args: argparse.Namespace, gguf: str, env: dict[str, str]) -> Server:
    port = free_port()
    command = [
        sys.executable, "-m", "quicksilver", "serve", "--model", gguf, "--weights", args.weights,
        "--port", str(port), "--threads", str(args.threads), "--max-batch-size", "16",
        "--max-queue", "256",
    ]  # fmt: skip
    server = Server("quicksilver", command, port, env)
    server.wait_ready("/health")
    return server


def llama_cpp(args: argparse.Namespace, gguf: str, env: dict[str, str]) -> Server:
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--n_threads",
        str(args.threads), "--n_ctx", "2048", "--port", str(port), "--host", "127.0.0.1",
        "--interrupt_requests", "False", "--verbose", "False",
    ]  # fmt: skip
    server = Server("llama-cpp-python", command, port, env)
    server.wait_ready("/v1/models")
    return server


def run_scenarios(server: Server, args: argparse.Namespace, repeat_concurrent: int) -> list:
    out, rss = [], []
    warm = Result(server.name, "warm-up")
    asyncio.run(concurrent(server.url, warm, 4, 4, 4))
    for run in range(repeat_concurrent):
        result = Result(server.name, f"concurrent {args.clients}x{args.requests}x{args.tokens}")
        asyncio.run(concurrent(server.url, result, args.clients, args.requests, args.tokens))
        rss.append(rss_mib(server.process.pid))
        result.note = f"run {run + 1}, RSS {rss[-1]:.0f} MiB"
        out.append(result)
    for rate in args.rates:
        result = Result(server.name, f"poisson {rate:g}/s x{args.poisson_requests}")
        asyncio.run(poisson(server.url, result, rate, args.poisson_requests, seed=7))
        out.append(result)
    result = Result(server.name, "short-behind-long")
    asyncio.run(short_behind_long(server.url, result))
    out.append(result)
    return out


def table(results: list[Result]) -> str:
    lines = [
        "| server | scenario | requests | errors | tokens/s | TTFT p50 / p99 (s) | "
        "ITL p50 / p99 (s) | note |",
        "|---|---|---:|---:|---:|---|---|---|",
    ]
    for r in results:
        rate = r.tokens / r.seconds if r.seconds else float("nan")
        lines.append(
            f"| {r.server} | {r.scenario} | {r.requests} | {r.errors} | {rate:.1f} | "
            f"{percentile(r.ttft, 0.5):.2f} / {percentile(r.ttft, 0.99):.2f} | "
            f"{percentile(r.gaps, 0.5):.3f} / {percentile(r.gaps, 0.99):.3f} | {r.note} |"
        )
    return "\n".join(lines)


def find_gguf(model: str) -> str:
    if model.endswith(".gguf"):
        return model
    from quicksilver.models import loading

    return str(loading.resolve(model).path)


def build_parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (the docs' commands are checked
    against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="short name or .gguf file")
    parser.add_argument("--weights", default="int4", help="our weight format (default: int4)")
    parser.add_argument(
        "--threads", type=int, default=2, help="CPU threads (default: 2, as its page was measured)"
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--poisson-requests", type=int, default=24)
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--markdown", default=str(ROOT / "docs" / "benchmarks" / "serve.md"))
    return parser


def main() -> int:
    args = build_parser().parse_args()
    if args.quick:
        args.clients, args.requests, args.tokens = 4, 8, 16
        args.rates, args.poisson_requests = [2.0], 6
    gguf = find_gguf(args.model)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results: list[Result] = []
    server = ours(args, gguf, env)
    try:
        results += run_scenarios(server, args, repeat_concurrent=2)
    finally:
        server.stop()
    if not args.no_llama_cpp:
        try:
            server = llama_cpp(args, gguf, env)
        except (RuntimeError, OSError) as err:
            results.append(Result("llama-cpp-python", "all", note=f"not run: {err}"))
        else:
            try:
                results += run_scenarios(server, args, repeat_concurrent=1)
            finally:
                server.stop()
    text = table(results)
    print(text)
    if not args.quick:
        write_markdown(Path(args.markdown), args, text, results)
    return 0 if all(r.errors == 0 for r in results) else 1


def write_markdown(path: Path, args: argparse.Namespace, text: str, results: list[Result]):
    command = " ".join(["benchmarks/serve_load.py", *sys.argv[1:]])
    concurrent_runs = {
        r.server: r for r in results if r.scenario.startswith("concurrent") and r.tokens
    }
    summary = []
    if {"quicksilver", "llama-cpp-python"} <= concurrent_runs.keys():
        a, b = concurrent_runs["quicksilver"], concurrent_runs["llama-cpp-python"]
        ratio = (a.tokens / a.seconds) / (b.tokens / b.seconds)
        summary.append(f"- concurrent throughput: {ratio:.2f}x llama-cpp-python's server.")
    body = f"""# `quicksilver serve` under load, beside llama-cpp-python's server

Reproduce (one run; both servers on this machine, one after the other, {args.threads} threads,
the same GGUF; ours with `--weights {args.weights}`):

```bash
.venv/bin/python {command}
```

{text}

{chr(10).join(summary)}

Columns: tokens/s is streamed completion tokens over the scenario's wall time; TTFT is from
sending a request to its first text; ITL is the time between consecutive streamed pieces of a
request. Our `concurrent` scenario runs twice against the same server; the note gives its RSS
after each run (the second run's growth is what a leak would show).
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)


if __name__ == "__main__":
    raise SystemExit(main())
