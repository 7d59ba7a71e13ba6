"""A soak test of ``quicksilver serve``: minutes of mixed good, hostile and disconnecting
clients against one server on 127.0.0.1, with its resident memory sampled throughout.

The server runs as a subprocess (so its RSS is measured alone). Three kinds of client loop
until the time is up, each a bounded number of concurrent tasks:

- good: completions (plain and streamed, dense, under a per-request policy, drafted with
  each speculative method), chat, /tokenize, /v1/models, /metrics; a stream must end with
  ``[DONE]`` and carry no error event;
- hostile: a rotation of bodies that must be refused with a 4xx (YAML alias bombs in the
  per-request ``set``, lone surrogates, JSON nested 100,000 deep, unknown models, roles and
  paths, oversize and malformed bodies, a policy path);
- disconnecting: plain and streamed completions (with the same per-request options)
  abandoned at a random moment: during prefill, or mid-stream after a few events, which the
  server must clean up after.

The table (requests by class, status counts, responses >= 500 as clients saw them and as the
server's /metrics counted them, abandoned requests included, RSS after the warm-up and at
the end, the drift) goes to ``docs/results/serve-soak.md`` with the exact command. Exit
status 1 if any response was a 5xx, a good or hostile request got no answer, or the server
died.

    .venv/bin/python benchmarks/serve_soak.py --minutes 3
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from local_server import free_port, rss_mib

OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "serve-soak.md"
PROMPTS = [
    "The history of the city begins",
    "A short guide to growing tomatoes:",
    "In computer science, a cache is",
    "Once upon a time, in a small village,",
]
HALTING = {"halting": {"relative_drift": 0.05, "min_layer": 8}}
# Per-request options generation requests rotate through (None: the server's defaults).
OPTIONS = [
    None,
    {"speculative": "ngram"},
    {"policy": HALTING},
    {"speculative": "layers"},
    {"policy": "paper"},
    {"speculative": "auto"},
]


def generation_body(i: int, **fields: object) -> dict:
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 12, "temperature": 0, **fields}
    options = OPTIONS[i % len(OPTIONS)]
    return body if options is None else {**body, "quicksilver": options}


def stream_is_whole(lines: list[str]) -> bool:
    """A stream ends with [DONE] and carries no error event."""
    events = [line[6:] for line in lines if line.startswith("data: ")]
    return bool(events) and events[-1] == "[DONE]" and not any('"error"' in e for e in events)


def alias_bomb(levels: int = 9) -> str:
    lines = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(lines) + "]"


def hostile_requests(model: str) -> list[tuple[str, str, bytes]]:
    """(method, path, raw body): each must be answered with a 4xx."""

    def body(value: object) -> bytes:
        return json.dumps(value).encode("ascii")  # a lone surrogate travels as \\ud800

    deep = 100_000
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    return [
        ("POST", "/v1/completions", body({"prompt": "Hi", "quicksilver": {"set": [
            f"halting.min_layer={alias_bomb()}"]}})),
        ("POST", "/v1/completions", body({"prompt": "\ud800", "max_tokens": 2})),
        ("POST", "/v1/chat/completions", body({"messages": [
            {"role": "user", "content": "a\udfff"}]})),
        ("POST", "/tokenize", body({"prompt": "\ud83d"})),
        ("POST", "/v1/completions", b"[" * deep + b"]" * deep),
        ("POST", "/v1/chat/completions", b'{"messages":' + b"[" * deep + b"]" * deep + b"}"),
        ("POST", "/v1/completions", body({"prompt": "Hi", "model": "gpt-4"})),
        ("POST", "/v1/chat/completions", body({**chat, "model": model + "-not"})),
        ("POST", "/v1/chat/completions", body({**chat, "messages": [
            {"role": "wizard", "content": "Hi"}]})),
        ("POST", "/v1/completions", body({"prompt": "Hi", "quicksilver": {
            "policy": "/etc/passwd"}})),
        ("POST", "/v1/completions", b"{not json"),
        ("POST", "/v1/completions", b"\xff\xfe\x00"),
        ("POST", "/v1/completions", body({"prompt": "x" * (2 << 20)})),
        ("POST", "/v1/completions", body({"prompt": "Hi", "stop": ["a"] * 50})),
        ("POST", "/v1/completions", body({"prompt": [10**12], "max_tokens": 2})),
        ("POST", "/detokenize", body({"tokens": [-1]})),
        ("GET", "/v1/no-such-path/{i}", b""),
        ("GET", "/v1/completions", b""),
    ]  # fmt: skip


@dataclass
class Tally:
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    no_answer: Counter = field(default_factory=Counter)  # transport errors, by class
    metrics_bytes: list[int] = field(default_factory=list)  # /metrics after warm-up, at the end

    def count(self, kind: str, status: int | str) -> None:
        self.statuses[kind][str(status)] += 1

    server_counted_5xx: int = 0  # responses >= 500 in the server's /metrics at the end

    def server_errors(self) -> int:
        seen = sum(n for c in self.statuses.values() for s, n in c.items() if s[0] == "5")
        return (
            seen + self.server_counted_5xx + sum(c["broken stream"] for c in self.statuses.values())
        )


async def good_client(client: httpx.AsyncClient, tally: Tally, model: str, stop: float) -> None:
    for i in itertools.count():
        if time.monotonic() > stop:
            return
        prompt = PROMPTS[i % len(PROMPTS)]
        step = i % 6
        try:
            if step == 0:
                body = generation_body(i // 6, model=model)
                status = (await client.post("/v1/completions", json=body)).status_code
            elif step == 1:
                body = generation_body(i // 6, stream=True)
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    lines = [line async for line in response.aiter_lines()]
                    status = response.status_code
                    if status == 200 and not stream_is_whole(lines):
                        status = "broken stream"
            elif step == 2:
                body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 12}
                status = (await client.post("/v1/chat/completions", json=body)).status_code
            elif step == 3:
                status = (await client.post("/tokenize", json={"prompt": prompt})).status_code
            elif step == 4:
                status = (await client.get("/v1/models")).status_code
            else:
                status = (await client.get("/metrics")).status_code
        except httpx.HTTPError:
            tally.no_answer["good"] += 1
            continue
        tally.count("good", status)


async def hostile_client(
    client: httpx.AsyncClient, tally: Tally, model: str, stop: float, offset: int
) -> None:
    requests = hostile_requests(model)
    for i in itertools.count(offset):
        if time.monotonic() > stop:
            return
        method, path, body = requests[i % len(requests)]
        headers = {"content-type": "application/json"}
        try:
            response = await client.request(
                method, path.format(i=i), content=body or None, headers=headers
            )
        except httpx.HTTPError:
            tally.no_answer["hostile"] += 1
            continue
        tally.count("hostile", response.status_code)
        await asyncio.sleep(0.05)


async def disconnecting_client(url: str, tally: Tally, stop: float, seed: int) -> None:
    """Requests abandoned at a random moment: before the first byte of the answer (a plain
    request, or a stream still in prefill) or after a few streamed events."""
    rng = random.Random(seed)
    host, port = url.removeprefix("http://").split(":")
    for i in itertools.count():
        if time.monotonic() > stop:
            return
        body = generation_body(i, max_tokens=64, stream=rng.random() < 0.5)
        data = json.dumps(body).encode()
        head = (
            "POST /v1/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        )
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(head.encode() + data)
            await writer.drain()
            events = rng.randint(0, 4) if body["stream"] else 0
            if events:
                while events and (line := await asyncio.wait_for(reader.readline(), 60)):
                    events -= line.startswith(b"data:")
            else:
                await asyncio.sleep(rng.random() * 0.3)
            writer.close()
            tally.count("disconnecting", "left")
        except (OSError, asyncio.TimeoutError):
            tally.no_answer["disconnecting"] += 1
        await asyncio.sleep(rng.random() * 0.1)


def server_5xx(metrics: str) -> int:
    """Responses >= 500 the server counted (those of abandoned requests included)."""
    found = re.findall(r'^\S*requests_total\{[^}]*code="5\d\d"[^}]*\} (\S+)', metrics, re.M)
    return int(sum(float(n) for n in found))


async def sample_rss(pid: int, every: float, stop: float, samples: list[tuple[float, float]]):
    start = time.monotonic()
    while time.monotonic() <= stop:
        samples.append((time.monotonic() - start, rss_mib(pid)))
        await asyncio.sleep(every)
    samples.append((time.monotonic() - start, rss_mib(pid)))


async def soak(url: str, pid: int, args: argparse.Namespace) -> tuple[Tally, list, float]:
    tally, samples = Tally(), []
    limits = httpx.Limits(max_connections=args.good + args.hostile + 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        warm_stop = time.monotonic() + args.warmup_seconds
        await asyncio.gather(*(good_client(client, Tally(), args.served, warm_stop) for _ in "ab"))
        warm_rss = rss_mib(pid)
        tally.metrics_bytes.append(len((await client.get("/metrics")).content))
        stop = time.monotonic() + args.minutes * 60
        await asyncio.gather(
            sample_rss(pid, args.sample_seconds, stop, samples),
            *(good_client(client, tally, args.served, stop) for _ in range(args.good)),
            *(hostile_client(client, tally, args.served, stop, k * 7) for k in range(args.hostile)),
            *(disconnecting_client(url, tally, stop, k) for k in range(args.disconnecting)),
        )
        metrics = (await client.get("/metrics")).text
        tally.metrics_bytes.append(len(metrics))
        tally.server_counted_5xx = server_5xx(metrics)
    return tally, samples, warm_rss


def by_minute(samples: list[tuple[float, float]]) -> list[str]:
    """The first sample of each minute and the last one, as "t: RSS" (tells a warm-up step
    from a steady climb)."""
    shown, minute = [], -1
    for seconds, rss in samples:
        if int(seconds // 60) > minute:
            minute = int(seconds // 60)
            shown.append(f"{seconds:.0f} s: {rss:.0f}")
    return [*shown, f"{samples[-1][0]:.0f} s: {samples[-1][1]:.0f}"]


def report(args: argparse.Namespace, tally: Tally, samples: list, warm: float, alive: bool) -> str:
    end, peak = samples[-1][1], max(rss for _, rss in samples)
    lines = [
        "# `quicksilver serve` soak",
        "",
        f"{args.minutes:g} minutes of mixed clients against `{args.model}` ({args.dtype}) on "
        f"127.0.0.1: {args.good} good, {args.hostile} hostile and {args.disconnecting} "
        f"disconnecting client loops, after a {args.warmup_seconds:g} s warm-up. "
        f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python "
        f"{platform.python_version()}.",
        "",
        "```bash",
        " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
        "```",
        "",
        "| class | requests | status counts | responses >= 500 | no answer |",
        "|---|---|---|---|---|",
    ]
    for kind in ("good", "hostile", "disconnecting"):
        counts = tally.statuses.get(kind, Counter())
        shown = ", ".join(f"{s}: {n}" for s, n in sorted(counts.items())) or "none"
        errors = sum(n for s, n in counts.items() if s[0] == "5")
        total = sum(counts.values()) + tally.no_answer[kind]
        lines.append(f"| {kind} | {total} | {shown} | {errors} | {tally.no_answer[kind]} |")
    lines += [
        "",
        f"Responses >= 500 counted by the server's `/metrics` (abandoned requests included): "
        f"{tally.server_counted_5xx}.",
        "",
        "| RSS after warm-up (MiB) | RSS at the end (MiB) | peak (MiB) | drift (MiB) | samples |",
        "|---|---|---|---|---|",
        f"| {warm:.0f} | {end:.0f} | {peak:.0f} | {end - warm:+.0f} | {len(samples)} every "
        f"{args.sample_seconds:g} s |",
        "",
        "RSS by minute of the soak (MiB): " + ", ".join(by_minute(samples)) + ".",
        "",
        f"Server alive at the end: {'yes' if alive else 'NO'}. `/metrics` was "
        f"{tally.metrics_bytes[0]} bytes after the warm-up and {tally.metrics_bytes[-1]} at the "
        "end (labels are route templates, so unknown paths add no series).",
        "",
        "Good clients cycle through completions (plain and streamed, 12 tokens, rotating "
        f"per-request options {json.dumps(OPTIONS)}), chat, "
        "`/tokenize`, `/v1/models` and `/metrics`. Hostile clients cycle through "
        f"{len(hostile_requests(args.served))} bodies that must be refused: a YAML alias bomb "
        "in `quicksilver.set`, lone surrogates in a prompt, chat content and `/tokenize`, JSON "
        "nested 100,000 deep, unknown model, role and paths, a policy path, malformed, "
        "non-UTF-8 and 2 MiB bodies, too many stop strings, out-of-vocabulary token ids, "
        'GET on a POST route. "left": the client closed the connection at a random moment '
        "(plain or streamed, 64 tokens, the same options; after 0-0.3 s or 1-4 streamed "
        'events); "broken stream": a 200 stream without [DONE] or with an error event; '
        '"no answer": a transport error where an answer was due.',
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (the docs' commands are checked
    against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-seconds", type=float, default=20.0)
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--good", type=int, default=3, help="good client loops")
    parser.add_argument("--hostile", type=int, default=2, help="hostile client loops")
    parser.add_argument("--disconnecting", type=int, default=2, help="leaving client loops")
    parser.add_argument("--out", type=Path, default=OUT, help="the Markdown table")
    return parser


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    if not 0 < args.minutes <= 24 * 60:
        parser.error("--minutes must be above 0 and at most a day")
    args.served = "soak-model"
    port = free_port()
    command = [
        sys.executable, "-m", "quicksilver", "serve", "--model", args.model, "--dtype",
        args.dtype, "--host", "127.0.0.1", "--port", str(port), "--served-model-name",
        args.served, "--max-batch-size", "8",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {server.stderr.read().decode()}")
            time.sleep(0.5)
        tally, samples, warm = asyncio.run(soak(url, server.pid, args))
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(30)
    text = report(args, tally, samples, warm, alive)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    unanswered = tally.no_answer["good"] + tally.no_answer["hostile"]
    return 0 if alive and tally.server_errors() == 0 and unanswered == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
