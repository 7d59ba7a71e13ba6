"""The OpenAI-compatible HTTP app: routes, request reading, errors, streaming.

Handlers never touch the model's engine: they check a request (``protocol``), queue it
(``scheduler``) and turn the worker's events into a JSON body or server-sent events
(``responses``). Tokenisation (``/tokenize``, prompts) runs in the handlers; it reads the
tokenizer only, which the worker never changes.
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

import quicksilver as qs
from quicksilver.policies import PRESETS
from quicksilver.policies.files import check_json_nesting
from quicksilver.serve import protocol
from quicksilver.serve.errors import APIError
from quicksilver.serve.metrics import CONTENT_TYPE, Metrics
from quicksilver.serve.responses import ChunkMaker, chat_body, completion_body, new_id
from quicksilver.serve.runner import StepRunner
from quicksilver.serve.scheduler import Job, JobResult, Scheduler
from quicksilver.text import encode_prompt, encode_stream

OPEN_PATHS = {"/health", "/metrics"}  # answered without the API key (probes, scrapers)
DISCONNECT_POLL_S = 0.5
# Request bodies nest about five levels (messages -> parts, quicksilver -> policy -> section);
# refusing deeper ones before parsing keeps json.loads' recursion and any walk short.
MAX_BODY_NESTING = 32
UNMATCHED = "unmatched"  # the metrics label of every path no route serves


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


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


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
            max_len=settings.max_context,
            prefill_tokens=settings.prefill_tokens,
            speculative=settings.speculative,
        )
        scheduler = Scheduler(runner, max_queue=settings.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="quicksilver", version=qs.__version__, lifespan=lifespan)
    app.state.scheduler, app.state.metrics, app.state.llm = scheduler, metrics, llm

    def route_label(request: Request) -> str:
        """The path template of the route that serves ``request`` (a method mismatch still
        names its route), or UNMATCHED: metrics never carry a path the client made up."""
        for route in app.router.routes:
            match, _ = route.matches(request.scope)
            if match != Match.NONE:
                return getattr(route, "path", UNMATCHED)
        return UNMATCHED

    # ------------------------------------------------------------ errors and auth

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        metrics.request(route_label(request), err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return await api_error(request, APIError(str(err.detail), err.status_code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        message = f"internal error: {type(err).__name__}: {err}"
        return await api_error(request, APIError(message, 500))

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Response:
        key, given = settings.api_key, request.headers.get("authorization", "")
        if key and request.url.path not in OPEN_PATHS and not bearer_matches(given, key):
            err = APIError("missing or wrong API key (Authorization: Bearer ...)", 401)
            metrics.request(route_label(request), 401)
            return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    async def read_json(request: Request) -> Any:
        limit = settings.max_body_bytes
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

    # ------------------------------------------------------------ generation

    async def generate(request: Request, kind: str) -> Response:
        started = time.perf_counter()
        body = await read_json(request)
        protocol.check_model(body, settings.model_names)
        parse = protocol.parse_chat if kind == "chat" else protocol.parse_completion
        spec = parse(body, llm, settings.model_name, settings.max_batch_size)
        policy = spec.policy or settings.default_policy
        protocol.check_drafting(policy, spec.speculative or settings.speculative)
        job = Job(spec, policy, asyncio.get_running_loop())
        scheduler.submit(job)
        endpoint = route_label(request)
        if spec.stream:
            return StreamingResponse(
                stream_events(job, endpoint, started), media_type="text/event-stream"
            )
        try:
            result = await wait_for_result(job, request)
        except ClientGone:
            metrics.request(endpoint, 499)
            return Response(status_code=499)
        rid, created = new_id(kind), int(time.time())
        build = chat_body if kind == "chat" else completion_body
        metrics.request(endpoint, 200, time.perf_counter() - started)
        return JSONResponse(build(llm, spec, result, rid, created))

    async def wait_for_result(job: Job, request: Request) -> JobResult:
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    raise ClientGone from None
                continue
            if event[0] == "error":
                raise event[1]
            if event[0] == "end":
                return event[1]

    async def stream_events(job: Job, endpoint: str, started: float) -> AsyncIterator[str]:
        chunks = ChunkMaker(job.spec, llm)
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
                    yield _sse(
                        chunks.text(event[1], event[2], event[3] if len(event) > 3 else None)
                    )
                elif event[0] == "error":
                    status = event[1].status
                    yield _sse(event[1].body())
                    break
                else:
                    for chunk in chunks.closing(event[1]):
                        yield _sse(chunk)
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not job.done:  # the client went away mid-stream: free its rows
                job.cancel()
                status = 499
            metrics.request(endpoint, status, time.perf_counter() - started)

    bodies = request_schemas(
        settings.model_names, llm.config.max_position_embeddings, llm.config.vocab_size
    )

    @app.post("/v1/completions", openapi_extra=bodies["completion"])
    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    @app.post("/v1/chat/completions", openapi_extra=bodies["chat"])
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    # ------------------------------------------------------------ the rest

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        metrics.request("/v1/models", 200)
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "quicksilver",
                    "max_model_len": llm.config.max_position_embeddings,
                }
            ],
        }

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": settings.model_name,
            "queued": scheduler.queued,
            "running": scheduler.running,
        }

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        text = metrics.render(scheduler.queued, scheduler.running)
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    @app.post("/tokenize", openapi_extra=bodies["tokenize"])
    async def tokenize(request: Request) -> dict[str, Any]:
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
            tokenizer = llm.tokenizer
            try:
                if special:
                    ids = encode_prompt(tokenizer, prompt) if prompt else []
                else:
                    ids = encode_stream(tokenizer, prompt)
            except qs.QuicksilverError as err:
                raise APIError(f"prompt: {err}", param="prompt") from None
        metrics.request("/tokenize", 200)
        positions = llm.config.max_position_embeddings
        return {"tokens": ids, "count": len(ids), "max_model_len": positions}

    @app.post("/detokenize", openapi_extra=bodies["detokenize"])
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await read_json(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list):
            raise APIError("tokens must be a list of token ids", param="tokens")
        try:
            text = llm.decode(tokens)
        except qs.QuicksilverError as err:
            raise APIError(str(err), param="tokens") from None
        metrics.request("/detokenize", 200)
        return {"prompt": text}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        tokenizer = llm.tokenizer
        metrics.request("/tokenizer_info", 200)
        return {
            "tokenizer_class": type(tokenizer).__name__,
            "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token,
            "pad_token": tokenizer.pad_token,
            "unk_token": getattr(tokenizer, "unk_token", None),
            "chat_template": getattr(tokenizer, "chat_template", None),
            "model_max_length": llm.config.max_position_embeddings,
            "vocab_size": llm.config.vocab_size,
        }

    return app


def bearer_matches(header: str, key: str) -> bool:
    """Whether an ``Authorization`` header carries ``key`` as a bearer token.

    The scheme is case-insensitive (RFC 9110 11.1: ``bearer`` and ``BEARER`` are ``Bearer``);
    the key itself is compared exactly, in constant time.
    """
    scheme, _, token = header.strip().partition(" ")
    matches = hmac.compare_digest(token.strip().encode(), key.encode())
    return scheme.lower() == "bearer" and matches


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------- OpenAPI request bodies


def _integer(low: int, high: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high}


def _array(items: dict[str, Any], least: int = 0, most: int | None = None) -> dict[str, Any]:
    schema = {"type": "array", "items": items, "minItems": least}
    return schema if most is None else {**schema, "maxItems": most}


_TEXT = {"type": "string", "minLength": 1}
_BOOLEAN = {"type": "boolean"}
_ONLY_ZERO = {"type": "number", "minimum": 0, "maximum": 0}  # penalties: only the no-op value
_STOP = {"type": "string", "minLength": 1, "maxLength": protocol.MAX_STOP_CHARS}
_MESSAGES = _array(
    {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": list(protocol.CHAT_ROLES)},
            "content": {
                "anyOf": [
                    {"type": "string"},
                    _array(
                        {
                            "type": "object",
                            "required": ["type"],
                            "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                        }
                    ),
                ]
            },
        },
    },
    least=1,
)


def request_schemas(
    models: tuple[str, ...], positions: int, vocab: int
) -> dict[str, dict[str, Any]]:
    """The JSON bodies the POST routes read, as ``openapi_extra`` for FastAPI. The handlers
    read raw JSON (to check it field by field, with messages OpenAI clients understand), so
    without these the OpenAPI schema would describe no body at all, and neither client
    generators nor a fuzzer would know what to send. The ranges are the server's own (the
    served names, the model's positions and vocabulary); what the schema cannot say (a prompt
    plus max_tokens within the context, rows within the batch) the handlers still check.
    """
    token_ids = _array(_integer(0, vocab - 1), least=1)
    common = {
        "model": {"type": "string", "enum": list(models)},
        "max_tokens": _integer(1, positions),
        "temperature": {"type": "number", "minimum": 0},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": _integer(-1, 2**31 - 1),
        "n": _integer(1, protocol.MAX_N),
        "stream": _BOOLEAN,
        "stream_options": {
            "type": "object",
            "properties": {"include_usage": _BOOLEAN},
            "additionalProperties": False,
        },
        "stop": {"anyOf": [_STOP, _array(_STOP, most=protocol.MAX_STOP)]},
        "seed": _integer(-(2**63), 2**64 - 1),
        "user": {"type": "string"},
        "presence_penalty": _ONLY_ZERO,
        "frequency_penalty": _ONLY_ZERO,
        "logit_bias": {"type": "object", "maxProperties": 0},
        "quicksilver": {
            "anyOf": [
                {"type": "string", "enum": list(PRESETS)},
                {
                    "type": "object",
                    "properties": {
                        "policy": {"anyOf": [{"type": "string", "enum": list(PRESETS)}, {}]},
                        "set": _array({"type": "string", "pattern": "^[a-z_]+\\.[a-z_]+=.*$"}),
                        "speculative": {
                            "anyOf": [
                                {"type": "string", "enum": list(qs.SPECULATIVE_METHODS)},
                                {
                                    "type": "object",
                                    "properties": {
                                        "method": {
                                            "type": "string",
                                            "enum": list(qs.SPECULATIVE_METHODS),
                                        },
                                        "num_tokens": _integer(1, 64),
                                        "max_ngram": _integer(1, 64),
                                        "min_ngram": _integer(1, 64),
                                    },
                                    "additionalProperties": False,
                                },
                            ]
                        },
                    },
                    "additionalProperties": False,
                },
            ]
        },
    }
    prompt = {"anyOf": [_TEXT, _array(_TEXT, 1), token_ids, _array(token_ids, 1)]}
    logprobs = _integer(0, protocol.MAX_LOGPROBS)
    completion = {**common, "prompt": prompt, "echo": _BOOLEAN, "logprobs": logprobs}
    chat = {
        **common,
        "messages": _MESSAGES,
        "logprobs": _BOOLEAN,
        "top_logprobs": logprobs,
        "max_completion_tokens": _integer(1, positions),
    }
    tokenize = {"prompt": {"type": "string"}, "messages": _MESSAGES, "add_special_tokens": _BOOLEAN}
    objects = {
        "completion": (completion, ["prompt"]),
        "chat": (chat, ["messages"]),
        "tokenize": (tokenize, []),
        "detokenize": ({"tokens": _array(_integer(0, vocab - 1))}, ["tokens"]),
    }
    return {
        name: {
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": fields,
                            "required": required,
                            "additionalProperties": False,
                        }
                    }
                },
            }
        }
        for name, (fields, required) in objects.items()
    }
