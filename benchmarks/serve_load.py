"""A bounded load test of ``quicksilver serve``: N concurrent streaming clients on 127.0.0.1.

Starts the server as a subprocess (so its memory is measured alone), twice: batching on
(``--max-batch-size`` = clients) and one request at a time (``--max-batch-size 1``), and
sends the same fixed set of streaming completion requests to each. Reports throughput,
p50/p99 time to first token and per-token latency, errors, and the server's RSS after a
warm-up and after the run.

    .venv/bin/python benchmarks/serve_load.py --clients 16 --requests 32 --max-tokens 24
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = [
    "The history of the city begins",
    "A short guide to growing tomatoes:",
    "In computer science, a cache is",
    "The best way to learn a language is",
    "Once upon a time, in a small village,",
    "The three laws of motion state that",
    "Photosynthesis is the process by which",
    "The main causes of the First World War were",
]


@dataclass
class Run:
    label: str
    ttft: list[float] = field(default_factory=list)
    per_token: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    seconds: float = 0.0
    rss_before: int = 0
    rss_after: int = 0
    batch_rows_mean: float = 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(client: httpx.AsyncClient, run: Run, prompt: str, max_tokens: int) -> None:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                run.errors += 1
                await response.aread()
                return
            done, usage = False, None
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    run.errors += 1
                    return
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    last = time.perf_counter()
                    first = first or last
                if chunk.get("usage"):
                    usage = chunk["usage"]
            if not done or usage is None or first is None:
                run.errors += 1
                return
    except httpx.HTTPError:
        run.errors += 1
        return
    n = usage["completion_tokens"]
    run.tokens += n
    run.ttft.append(first - start)
    if n > 1:
        run.per_token.append((last - first) / (n - 1))


async def load(url: str, run: Run, clients: int, requests: int, max_tokens: int) -> None:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(f"{PROMPTS[i % len(PROMPTS)]} (request {i})")
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                await one_request(client, run, queue.get_nowait(), max_tokens)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        run.seconds = time.perf_counter() - start


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def serve_and_load(args: argparse.Namespace, batch: int, label: str) -> Run:
    port = free_port()
    command = [
        sys.executable, "-m", "quicksilver", "serve", "--model", args.model, "--dtype",
        args.dtype, "--port", str(port), "--max-batch-size", str(batch),
        "--max-queue", str(max(64, args.clients)),
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    run = Run(label)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {server.stderr.read().decode()}")
            time.sleep(0.2)
        warm = Run("warm-up")
        asyncio.run(load(url, warm, min(args.clients, 4), 4, 4))
        run.rss_before = rss_bytes(server.pid)
        asyncio.run(load(url, run, args.clients, args.requests, args.max_tokens))
        run.rss_after = rss_bytes(server.pid)
        text = httpx.get(url + "/metrics").text
        batches = metric(text, "quicksilver_batch_rows_count")
        run.batch_rows_mean = metric(text, "quicksilver_batch_rows_sum") / max(batches, 1)
    finally:
        server.terminate()
        server.wait(30)
    return run


def report(runs: list[Run]) -> str:
    header = (
        "| server | tokens/s | p50 TTFT (s) | p99 TTFT (s) | p50 s/token | p99 s/token | "
        "mean batch rows | errors | RSS before → after (MiB) |"
    )
    lines = [header, "|" + "---|" * 9]
    for r in runs:
        lines.append(
            f"| {r.label} | {r.tokens / r.seconds:.1f} | {percentile(r.ttft, 0.5):.2f} | "
            f"{percentile(r.ttft, 0.99):.2f} | {percentile(r.per_token, 0.5):.3f} | "
            f"{percentile(r.per_token, 0.99):.3f} | {r.batch_rows_mean:.1f} | {r.errors} | "
            f"{r.rss_before / 2**20:.0f} → {r.rss_after / 2**20:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args()
    runs = [
        serve_and_load(args, args.clients, f"batched (max {args.clients} rows)"),
        serve_and_load(args, 1, "one at a time"),
    ]
    print(
        f"{args.clients} streaming clients, {args.requests} requests, {args.max_tokens} tokens "
        f"each, {args.model} {args.dtype}, {os.cpu_count()} CPUs"
    )
    print(report(runs))
    speedup = (runs[0].tokens / runs[0].seconds) / (runs[1].tokens / runs[1].seconds)
    print(f"batching: {speedup:.2f}x the throughput of one at a time")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in runs], indent=2))
    return 0 if all(r.errors == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
