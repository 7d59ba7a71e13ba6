"""The OpenAI-compatible HTTP app: routes, request reading, errors, streaming.

Handlers never touch the model's engine: they check a request (``protocol``), queue it
(``scheduler``) and turn the worker's events into a JSON body or server-sent events
(``responses``). Tokenisation (``/tokenize``, prompts) runs in the handlers; it reads the
tokenizer only, which the worker never changes. Handlers are plain module-level functions;
what they share (the model, the settings, the scheduler, the metrics) is one ``ServerState``
on ``app.state.server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

import quicksilver as qs
from quicksilver.models.config import ModelConfig
from quicksilver.policies.files import check_json_nesting
from quicksilver.serve import protocol
from quicksilver.serve.errors import APIError, internal_error
from quicksilver.serve.metrics import CONTENT_TYPE, Metrics
from quicksilver.serve.responses import ChunkMaker, chat_body, completion_body, new_id
from quicksilver.serve.runner import StepRunner
from quicksilver.serve.scheduler import Job, JobResult, Scheduler
from quicksilver.serve.schemas import request_schemas
from quicksilver.text import encode_prompt, encode_stream

OPEN_PATHS = {"/health", "/metrics"}  # answered without the API key (probes, scrapers)
# Request bodies nest about five levels (messages -> parts, quicksilver -> policy -> section);
# refusing deeper ones before parsing keeps json.loads' recursion and any walk short.
MAX_BODY_NESTING = 32
UNMATCHED = "unmatched"  # the metrics label of every path no route serves
CLIENT_CLOSED = 499  # the status logged (never sent) for a client that left before its answer


# A row's positions when --max-context is not given: the model's, up to this many (a
# 16-row cache of SmolLM2 at 2,048 positions is 750 MB in bfloat16).
DEFAULT_ROW_POSITIONS = 2048


@dataclass
class Settings:
    model_name: str
    api_key: str | None = None
    max_batch_size: int = 16  # rows (prompts x n) running at once, per policy
    max_context: int | None = None  # positions per row (None: the model's, at most 2048)
    prefill_tokens: int = 512  # prompt tokens read per step while other rows run
    max_queue: int = 64  # requests waiting for a batch
    max_body_bytes: int = 1 << 20
    default_policy: qs.Policy | None = None
    speculative: qs.SpeculativeConfig | None = None  # for requests that name none
    # Other names a request's ``model`` may use for the same model (e.g. the file or short
    # name the server was started with); any other name is 404, as OpenAI answers.
    model_aliases: tuple[str, ...] = ()

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.model_name, *self.model_aliases)))

    def row_positions(self, config: ModelConfig) -> int:
        """Positions a row holds here: what a request's prompt and tokens must fit."""
        return self.max_context or min(config.max_position_embeddings, DEFAULT_ROW_POSITIONS)


@dataclass
class ServerState:
    """Everything the handlers share, kept on ``app.state.server``."""

    llm: qs.LLM
    settings: Settings
    scheduler: Scheduler
    metrics: Metrics


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def server_of(request: Request) -> ServerState:
    return request.app.state.server


def create_app(llm: qs.LLM, settings: Settings, scheduler: Scheduler | None = None) -> FastAPI:
    """The app for one loaded model. ``scheduler`` replaces the default one (tests hold the
    worker with it); otherwise a worker running ``StepRunner`` starts with the app."""
    if llm.tokenizer is None:
        raise qs.QuicksilverError("serving needs a model that ships a tokenizer")
    metrics = Metrics()
    if scheduler is None:
        runner = StepRunner(
            llm,
            metrics,
            max_rows=settings.max_batch_size,
            max_len=settings.row_positions(llm.config),
            prefill_tokens=settings.prefill_tokens,
            speculative=settings.speculative,
        )
        scheduler = Scheduler(runner, max_queue=settings.max_queue)
    app = FastAPI(title="quicksilver", version=qs.__version__, lifespan=run_worker)
    app.state.server = ServerState(llm, settings, scheduler, metrics)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
    app.add_middleware(BearerAuth)
    bodies = request_schemas(
        settings.model_names, llm.config.max_position_embeddings, llm.config.vocab_size
    )
    post, get = ["POST"], ["GET"]
    app.add_api_route(
        "/v1/completions", completions, methods=post, openapi_extra=bodies["completion"]
    )
    app.add_api_route(
        "/v1/chat/completions", chat_completions, methods=post, openapi_extra=bodies["chat"]
    )
    app.add_api_route("/v1/models", models, methods=get)
    app.add_api_route("/health", health, methods=get)
    app.add_api_route("/metrics", prometheus, methods=get)
    app.add_api_route("/tokenize", tokenize, methods=post, openapi_extra=bodies["tokenize"])
    app.add_api_route("/detokenize", detokenize, methods=post, openapi_extra=bodies["detokenize"])
    app.add_api_route("/tokenizer_info", tokenizer_info, methods=get)
    return app


@contextlib.asynccontextmanager
async def run_worker(app: FastAPI) -> AsyncIterator[None]:
    """The scheduler's worker runs while the app serves."""
    scheduler = app.state.server.scheduler
    scheduler.start()
    try:
        yield
    finally:
        scheduler.stop()


def route_label(request: Request) -> str:
    """The path template of the route that serves ``request`` (a method mismatch still names
    its route), or UNMATCHED: metrics never carry a path the client made up."""
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            return getattr(route, "path", UNMATCHED)
    return UNMATCHED


# ---------------------------------------------------------------- errors and auth


async def api_error(request: Request, err: APIError) -> JSONResponse:
    server_of(request).metrics.request(route_label(request), err.status)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return await api_error(request, APIError(str(err.detail), err.status_code))


async def unexpected_error(request: Request, err: Exception) -> JSONResponse:
    return await api_error(request, internal_error(err))


class BearerAuth:
    """Refuses every path but ``OPEN_PATHS`` without the server's API key (when it has one).

    A plain ASGI middleware rather than ``@app.middleware("http")``: Starlette's
    ``BaseHTTPMiddleware`` wraps ``receive`` so that a handler can no longer see its client
    disconnect, and a plain request whose client left would run to its end.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            server = server_of(request)
            key, given = server.settings.api_key, request.headers.get("authorization", "")
            if key and request.url.path not in OPEN_PATHS and not bearer_matches(given, key):
                err = APIError("missing or wrong API key (Authorization: Bearer ...)", 401)
                server.metrics.request(route_label(request), 401)
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def bearer_matches(header: str, key: str) -> bool:
    """Whether an ``Authorization`` header carries ``key`` as a bearer token.

    The scheme is case-insensitive (RFC 9110 11.1: ``bearer`` and ``BEARER`` are ``Bearer``);
    the key itself is compared exactly, in constant time.
    """
    scheme, _, token = header.strip().partition(" ")
    matches = hmac.compare_digest(token.strip().encode(), key.encode())
    return scheme.lower() == "bearer" and matches


async def read_json(request: Request) -> Any:
    """The body as JSON, refused (4xx) when too large, not UTF-8, too deep or not JSON."""
    limit = server_of(request).settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(f"the request body is over the server's limit of {limit} bytes", 413)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(f"the request body is over the server's limit of {limit} bytes", 413)
    try:
        text = body.decode("utf-8")  # JSON on the wire is UTF-8 (RFC 8259)
    except UnicodeDecodeError as err:
        raise APIError(
            f"the request body is not UTF-8 (byte 0x{body[err.start]:02x} at offset "
            f"{err.start}); send JSON encoded as UTF-8"
        ) from None
    try:
        check_json_nesting(body, MAX_BODY_NESTING)
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise APIError(f"the request body is not valid JSON: {err}") from None
    if protocol.has_lone_surrogate(text):
        protocol.check_strings(value)  # raises, naming the field
    return value


# ---------------------------------------------------------------- generation


async def completions(request: Request) -> Response:
    return await generate(request, "completion")


async def chat_completions(request: Request) -> Response:
    return await generate(request, "chat")


async def generate(request: Request, kind: str) -> Response:
    """Check the request, queue its job, answer with its result or stream its events."""
    started = time.perf_counter()
    server = server_of(request)
    llm, settings = server.llm, server.settings
    body = await read_json(request)
    protocol.check_model(body, settings.model_names)
    parse = protocol.parse_chat if kind == "chat" else protocol.parse_completion
    limits = protocol.Limits(settings.max_batch_size, settings.row_positions(llm.config))
    spec = parse(body, llm, settings.model_name, limits)
    policy = spec.policy or settings.default_policy
    protocol.check_drafting(policy, spec.speculative or settings.speculative)
    job = Job(spec, policy, asyncio.get_running_loop())
    server.scheduler.submit(job)
    endpoint = route_label(request)
    if spec.stream:
        events = stream_events(server, job, endpoint, started)
        return StreamingResponse(events, media_type="text/event-stream")
    try:
        result = await wait_for_result(job, request.receive)
    except ClientGone:
        server.metrics.request(endpoint, CLIENT_CLOSED)
        return Response(status_code=CLIENT_CLOSED)
    rid, created = new_id(kind), int(time.time())
    build = chat_body if kind == "chat" else completion_body
    server.metrics.request(endpoint, 200, time.perf_counter() - started)
    return JSONResponse(build(llm, spec, result, rid, created))


async def wait_for_result(job: Job, receive: Receive) -> JobResult:
    """The job's result; if the client hangs up first, the job is cancelled (the worker frees
    its rows at its next step) and ``ClientGone`` raised. The body has been read, so the
    next message ``receive`` gives is the disconnect: waiting on it costs nothing, and a
    client that left is noticed at once instead of at a polling tick."""
    gone = asyncio.ensure_future(until_disconnected(receive))
    try:
        while True:
            event = asyncio.ensure_future(job.events.get())
            await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not event.done():
                event.cancel()
                job.cancel()
                raise ClientGone
            kind, payload = event.result()[:2]
            if kind == "error":
                raise payload
            if kind == "end":
                return payload
    finally:
        gone.cancel()


async def until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def stream_events(
    server: ServerState, job: Job, endpoint: str, started: float
) -> AsyncIterator[str]:
    """The job's events as server-sent events, ending with ``[DONE]``. A failure after the
    200 went out can only be told inside the stream: it becomes an error event."""
    chunks = ChunkMaker(job.spec, server.llm)
    status = 200
    try:
        for chunk in chunks.opening():
            yield _sse(chunk)
        if job.spec.echo:
            for p, text in enumerate(job.spec.prompt_texts):
                for j in range(job.spec.n):
                    yield _sse(chunks.echo(p * job.spec.n + j, text))
        while True:
            event = await job.events.get()
            if event[0] == "text":
                yield _sse(chunks.text(event[1], event[2], event[3] if len(event) > 3 else None))
            elif event[0] == "error":
                status = event[1].status
                yield _sse(event[1].body())
                break
            else:
                for chunk in chunks.closing(event[1]):
                    yield _sse(chunk)
                break
        yield "data: [DONE]\n\n"
    except Exception as err:  # told to the client, inside the stream
        status = 500
        job.cancel()
        yield _sse(internal_error(err).body())
        yield "data: [DONE]\n\n"
    finally:
        if not job.done:  # the client went away mid-stream: free its rows
            job.cancel()
            status = CLIENT_CLOSED if status == 200 else status
        server.metrics.request(endpoint, status, time.perf_counter() - started)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------- the rest


async def models(request: Request) -> dict[str, Any]:
    server = server_of(request)
    server.metrics.request("/v1/models", 200)
    return {
        "object": "list",
        "data": [
            {
                "id": server.settings.model_name,
                "object": "model",
                "created": 0,
                "owned_by": "quicksilver",
                "max_model_len": server.llm.config.max_position_embeddings,
            }
        ],
    }


async def health(request: Request) -> dict[str, Any]:
    server = server_of(request)
    return {
        "status": "ok",
        "model": server.settings.model_name,
        "queued": server.scheduler.queued,
        "running": server.scheduler.running,
    }


async def prometheus(request: Request) -> PlainTextResponse:
    server = server_of(request)
    text = server.metrics.render(server.scheduler.queued, server.scheduler.running)
    return PlainTextResponse(text, media_type=CONTENT_TYPE)


async def tokenize(request: Request) -> dict[str, Any]:
    server = server_of(request)
    llm = server.llm
    body = await read_json(request)
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    special = body.get("add_special_tokens", True)
    if not isinstance(special, bool):
        raise APIError("add_special_tokens must be true or false", param="add_special_tokens")
    if "messages" in body:
        ids = protocol.chat_prompt(body["messages"], llm)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise APIError("prompt must be a string", param="prompt")
        try:
            if special:
                ids = encode_prompt(llm.tokenizer, prompt) if prompt else []
            else:
                ids = encode_stream(llm.tokenizer, prompt)
        except qs.QuicksilverError as err:
            raise APIError(f"prompt: {err}", param="prompt") from None
    server.metrics.request("/tokenize", 200)
    positions = llm.config.max_position_embeddings
    return {"tokens": ids, "count": len(ids), "max_model_len": positions}


async def detokenize(request: Request) -> dict[str, Any]:
    server = server_of(request)
    body = await read_json(request)
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list):
        raise APIError("tokens must be a list of token ids", param="tokens")
    try:
        text = server.llm.decode(tokens)
    except qs.QuicksilverError as err:
        raise APIError(str(err), param="tokens") from None
    server.metrics.request("/detokenize", 200)
    return {"prompt": text}


async def tokenizer_info(request: Request) -> dict[str, Any]:
    server = server_of(request)
    tokenizer, config = server.llm.tokenizer, server.llm.config
    server.metrics.request("/tokenizer_info", 200)
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "eos_token": tokenizer.eos_token,
        "bos_token": tokenizer.bos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": getattr(tokenizer, "unk_token", None),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "model_max_length": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
    }
