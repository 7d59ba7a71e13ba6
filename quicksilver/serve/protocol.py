"""Request bodies of the OpenAI-compatible endpoints, checked into one ``GenerationSpec``
whose ``qs.GenerationOptions`` the batch receives as they are.

Every field is checked before a request is queued, so a mistake costs the client one 400
with a message naming the field, and never a slot in a batch. Fields the server does not
implement are refused rather than silently ignored (a client asking for a penalty would
otherwise get text it did not ask for), except the ones that are no-ops at their defaults.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import quicksilver as qs
from quicksilver.errors import QuicksilverError
from quicksilver.runtime.cache import sequence_fit_error
from quicksilver.runtime.speculative import speculative_policy_error
from quicksilver.serve.errors import APIError
from quicksilver.serve.policy_field import parse_policy
from quicksilver.text import check_text

MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20  # top alternatives per token (vLLM's limit)
MAX_N = 16
CHAT_DEFAULT_MAX_TOKENS = 256  # chat without max_tokens: this, or what the context leaves
_SURROGATE_ESCAPE = re.compile(r"(\\+)u([dD][89a-fA-F][0-9a-fA-F]{2})")
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # OpenAI's roles

COMMON_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "quicksilver",
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "logprobs", "suffix", "best_of"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}


@dataclass(frozen=True)
class GenerationSpec:
    """One checked request: what to run (the prompts, under ``policy``, generated as
    ``options`` say: built here once and handed to the batch untouched) and how to answer."""

    kind: str  # "completion" or "chat"
    model: str
    prompts: list[list[int]]
    options: qs.GenerationOptions
    echo: bool
    stream: bool
    include_usage: bool
    policy: qs.Policy | None  # None: the server's default
    score_only: bool = False  # echo with max_tokens 0: score the prompts, generate nothing
    prompt_texts: list[str] = field(default_factory=list)  # for echo

    @property
    def n(self) -> int:
        return self.options.n

    @property
    def logprobs(self) -> int | None:
        """Top alternatives to return per token; None: no logprobs."""
        return self.options.logprobs

    @property
    def speculative(self) -> qs.SpeculativeConfig | None:
        """The request's own drafting; None: the server's default."""
        return self.options.speculative or None

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


# ---------------------------------------------------------------- the whole body


def has_lone_surrogate(json_text: str) -> bool:
    """Whether JSON text escapes a lone surrogate (``"\\ud800"`` with no partner), found on
    the raw text with one regular-expression pass: strict UTF-8 cannot carry surrogates, so
    only ``\\uXXXX`` escapes can, and a run of backslashes escapes the ``u`` only when it is
    odd (``\\\\ud800`` is a backslash and the text "ud800")."""
    expected_low_at = -1  # where a low surrogate must start to pair with the last high one
    for match in _SURROGATE_ESCAPE.finditer(json_text):
        if len(match.group(1)) % 2 == 0:
            continue
        start = match.end() - 6
        if match.group(2).lower() < "dc":  # a high (leading) surrogate
            if expected_low_at >= 0:
                return True
            expected_low_at = match.end()
        elif start != expected_low_at:
            return True
        else:
            expected_low_at = -1
    return expected_low_at >= 0


def check_strings(body: Any) -> None:
    """Name the string of a parsed body (keys included) that is not valid Unicode, after
    ``has_lone_surrogate`` found one: JSON's ``"\\ud800"`` gives Python a lone surrogate,
    which the tokenizer, the stop-string search or the JSON answer would trip over later.
    Iterative, so no body can exhaust the stack; paths are spelled out only for the error."""
    pending: list[tuple[tuple[str | int, ...], Any]] = [((), body)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str):
            _valid_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                _valid_text(key, path, "a field name in ")
                if isinstance(item, (str, dict, list)):
                    pending.append(((*path, key), item))
        elif isinstance(value, list):
            for i, item in enumerate(value):  # token ids: a long list of ints, skipped fast
                if isinstance(item, str):
                    _valid_text(item, (*path, i))
                elif isinstance(item, (dict, list)) and item:
                    pending.append(((*path, i), item))
    raise APIError("the request body holds a lone surrogate escape; text must be valid Unicode")


def _valid_text(text: str, path: tuple[str | int, ...], prefix: str = "") -> None:
    if text.isascii():
        return
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    try:
        check_text(text, prefix + (where or "the request body"))
    except QuicksilverError as err:
        raise APIError(str(err), param=str(path[0]) if path else None) from None


def check_model(body: Any, served: tuple[str, ...]) -> None:
    """``model``, when given, must name the served model (or one of its aliases): a client
    that asks for another model must learn it is not talking to that model (OpenAI and
    vLLM answer 404 ``model_not_found``)."""
    model = body.get("model") if isinstance(body, dict) else None
    if model is None:
        return
    if not isinstance(model, str):
        raise APIError(f"model must be a string, got {model!r}", param="model")
    if model not in served:
        raise APIError(
            f"the model {model[:100]!r} does not exist here; this server serves {served[0]!r} "
            "(see /v1/models)",
            404,
            param="model",
            kind="invalid_request_error",
            code="model_not_found",
        )


# ---------------------------------------------------------------- field checks


def _integer(body: Mapping[str, Any], name: str, default: Any, low: int, high: int) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise APIError(f"{name} must be an integer, got {value!r}", param=name)
    if not low <= value <= high:
        raise APIError(f"{name} must be from {low} to {high}, got {value}", param=name)
    return int(value)


def _number(body: Mapping[str, Any], name: str, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise APIError(f"{name} must be a number, got {value!r}", param=name)
    if not math.isfinite(value):
        raise APIError(f"{name} must be finite, got {value!r}", param=name)
    return float(value)


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(f"{name} must be true or false, got {value!r}", param=name)
    return value


def _check_fields(body: Any, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(f"unknown field {unknown[0]!r}", param=unknown[0])
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0) != 0.0:
            raise APIError(f"{name} is not supported; leave it at 0", param=name)
    if body.get("logit_bias"):
        raise APIError("logit_bias is not supported", param="logit_bias")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise APIError(f"user must be a string, got {user!r}", param="user")


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError("stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP:
        raise APIError(f"stop takes at most {MAX_STOP} strings, got {len(stops)}", param="stop")
    if not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise APIError(f"stop strings must have 1 to {MAX_STOP_CHARS} characters", param="stop")
    return tuple(stops)


def _sampling(body: Mapping[str, Any]) -> qs.SamplingConfig:
    temperature = _number(body, "temperature", 1.0)  # OpenAI's default: sampling
    top_p = _number(body, "top_p", 1.0)
    top_k = _integer(body, "top_k", 0, -1, 2**31 - 1)
    seed = _integer(body, "seed", None, -(2**63), 2**64 - 1)
    try:
        return qs.SamplingConfig(
            temperature=temperature, top_p=top_p, top_k=max(top_k, 0), seed=seed
        )
    except QuicksilverError as err:
        raise APIError(str(err)) from None


def _stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(
            "stream_options must be an object with only include_usage", param="stream_options"
        )
    if not stream:
        raise APIError("stream_options needs stream=true", param="stream_options")
    return stream, _flag(options, "include_usage")


def parse_speculative(value: Any) -> qs.SpeculativeConfig | None:
    """``quicksilver.speculative``: a drafting method or ``{"method": ..., "num_tokens": ...}``
    (verified decoding: the same tokens in fewer forwards); None leaves the server's default."""
    if not isinstance(value, dict) or value.get("speculative") is None:
        return None
    try:
        return qs.speculative_config(value["speculative"])
    except QuicksilverError as err:
        raise APIError(f"invalid speculative setting: {err}", param="quicksilver") from None


# ---------------------------------------------------------------- prompts


def _prompt_ids(prompt: Any, llm: qs.LLM, what: str) -> list[int]:
    """One prompt (text or token ids) as checked token ids."""
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(f"{what} is empty", param="prompt")
        try:
            return llm.encode(prompt)
        except QuicksilverError as err:
            raise APIError(f"{what}: {err}", param="prompt") from None
    if not prompt:
        raise APIError(f"{what} has no tokens", param="prompt")
    vocab = llm.config.vocab_size
    for token in prompt:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
            raise APIError(
                f"{what} holds {token!r}, not a token id of the vocabulary 0..{vocab - 1}",
                param="prompt",
            )
    return list(prompt)


def completion_prompts(prompt: Any, llm: qs.LLM) -> list[list[int]]:
    """``prompt`` as OpenAI takes it: a text, a list of texts, token ids or lists of ids."""
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)
    ):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        items = prompt
    else:
        raise APIError(
            "prompt must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists (and not empty)",
            param="prompt",
        )
    many = len(items) > 1
    return [
        _prompt_ids(p, llm, f"prompt {i}" if many else "the prompt") for i, p in enumerate(items)
    ]


def chat_prompt(messages: Any, llm: qs.LLM) -> list[int]:
    """The messages through the tokenizer's chat template, the assistant's turn opened."""
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list", param="messages")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(f"messages[{i}] must be an object with a role", param="messages")
        if message["role"] not in CHAT_ROLES:
            raise APIError(
                f"messages[{i}].role is {message['role'][:50]!r}; use one of "
                f"{', '.join(CHAT_ROLES)}",
                param="messages",
            )
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(f"messages[{i}]: only text content is supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise APIError(f"messages[{i}].content must be a string", param="messages")
        turns.append({"role": message["role"], "content": content})
    tokenizer = llm.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError("this model has no chat template; use /v1/completions", param="messages")
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # a Jinja template raising on these turns (e.g. role order)
        raise APIError(f"the chat template refused the messages: {err}", param="messages") from None
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise APIError("the messages encode to no tokens", param="messages")
    return ids


def check_drafting(policy: qs.Policy | None, speculative: qs.SpeculativeConfig | None) -> None:
    """A 400 for drafting that cannot run under the policy the request runs with (each the
    request's own or the server's default): checked before the job is queued, since a
    streamed answer has sent its 200 and first token by the time a decode step finds it."""
    error = speculative_policy_error(policy, speculative)
    if error is not None:
        raise APIError(f"invalid speculative setting: {error}", param="quicksilver")


# ---------------------------------------------------------------- the two endpoints


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server: rows (prompts x n) and positions per row."""

    rows: int
    positions: int


def _fit(prompts: list[list[int]], limits: Limits, max_tokens: int, explicit: bool) -> int:
    """``max_tokens`` checked against the server's positions per row by the one fit rule (a
    client that named none gets what the context leaves, up to the default), here, before
    anything is queued: no prompt of a request is admitted while another is refused."""
    positions = limits.positions
    longest = max(map(len, prompts))
    if longest > positions:
        raise APIError(
            f"the prompt has {longest} tokens, more than the server's context of {positions}",
            param="prompt",
        )
    if not explicit:
        max_tokens = max(1, min(max_tokens, positions - longest + 1))
    error = sequence_fit_error(
        longest, max_tokens, positions, f"the server's context of {positions}"
    )
    if error is not None:
        raise APIError(f"{error}; lower max_tokens", param="max_tokens")
    return max_tokens


def _check_rows(prompts: list[list[int]], n: int, max_rows: int) -> None:
    if len(prompts) * n > max_rows:
        raise APIError(
            f"this request needs {len(prompts) * n} rows (prompts x n), more than the "
            f"server's batch size of {max_rows}; send fewer prompts or a lower n",
            param="n",
        )


def _options(
    body: Mapping[str, Any], max_new_tokens: int, logprobs: int | None, n: int
) -> qs.GenerationOptions:
    """The request's GenerationOptions, built once (the batch takes them as they are)."""
    try:
        return qs.GenerationOptions(
            max_new_tokens=max_new_tokens,
            sampling=_sampling(body),
            stop=_stop(body),
            logprobs=logprobs,
            speculative=parse_speculative(body.get("quicksilver")),
            n=n,
        )
    except QuicksilverError as err:
        raise APIError(str(err)) from None


def parse_completion(body: Any, llm: qs.LLM, model: str, limits: Limits) -> GenerationSpec:
    _check_fields(body, COMPLETION_FIELDS)
    if body.get("suffix") is not None:
        raise APIError("suffix is not supported", param="suffix")
    if "prompt" not in body:
        raise APIError("prompt is required", param="prompt")
    echo = _flag(body, "echo")
    n = _integer(body, "n", 1, 1, MAX_N)
    if body.get("best_of") not in (None, n):
        raise APIError("best_of must equal n (or be left out)", param="best_of")
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    max_tokens = _integer(body, "max_tokens", 16, 0 if echo else 1, 2**31 - 1)
    stream, include_usage = _stream(body)
    prompts = completion_prompts(body["prompt"], llm)
    max_tokens = _fit(prompts, limits, max_tokens, explicit=True)
    _check_rows(prompts, n, limits.rows)
    options = _options(body, max(1, max_tokens), logprobs, n)
    return GenerationSpec(
        kind="completion",
        model=model,
        prompts=prompts,
        options=options,
        echo=echo,
        stream=stream,
        include_usage=include_usage,
        policy=parse_policy(body.get("quicksilver"), llm),
        score_only=max_tokens == 0,
        prompt_texts=[llm.decode(p) for p in prompts] if echo else [],
    )


def parse_chat(body: Any, llm: qs.LLM, model: str, limits: Limits) -> GenerationSpec:
    _check_fields(body, CHAT_FIELDS)
    if "messages" not in body:
        raise APIError("messages is required", param="messages")
    limit = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    explicit = body.get(limit) is not None
    max_tokens = _integer(body, limit, CHAT_DEFAULT_MAX_TOKENS, 1, 2**31 - 1)
    want_logprobs = _flag(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
    if body.get("top_logprobs") is not None and not want_logprobs:
        raise APIError("top_logprobs needs logprobs=true", param="top_logprobs")
    stream, include_usage = _stream(body)
    prompts = [chat_prompt(body["messages"], llm)]
    max_tokens = _fit(prompts, limits, max_tokens, explicit)
    n = _integer(body, "n", 1, 1, MAX_N)
    _check_rows(prompts, n, limits.rows)
    options = _options(body, max_tokens, top if want_logprobs else None, n)
    return GenerationSpec(
        kind="chat",
        model=model,
        prompts=prompts,
        options=options,
        echo=False,
        stream=stream,
        include_usage=include_usage,
        policy=parse_policy(body.get("quicksilver"), llm),
    )
