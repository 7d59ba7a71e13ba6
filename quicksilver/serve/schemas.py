"""The JSON bodies the POST routes read, as OpenAPI schemas (FastAPI's ``openapi_extra``).

The handlers read raw JSON (to check it field by field, with messages OpenAI clients
understand), so without these the OpenAPI schema would describe no body at all, and neither
client generators nor a fuzzer would know what to send. The ranges are the server's own (the
served names, the model's positions and vocabulary); what a schema cannot say (a prompt plus
max_tokens within the context, rows within the batch) the handlers still check.
"""

from __future__ import annotations

from typing import Any

import quicksilver as qs
from quicksilver.policies import PRESETS
from quicksilver.serve import protocol


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
_SPECULATIVE_METHOD = {"type": "string", "enum": list(qs.SPECULATIVE_METHODS)}
_QUICKSILVER = {
    "anyOf": [
        {"type": "string", "enum": list(PRESETS)},
        {
            "type": "object",
            "properties": {
                "policy": {"anyOf": [{"type": "string", "enum": list(PRESETS)}, {}]},
                "set": _array({"type": "string", "pattern": "^[a-z_]+\\.[a-z_]+=.*$"}),
                "speculative": {
                    "anyOf": [
                        _SPECULATIVE_METHOD,
                        {
                            "type": "object",
                            "properties": {
                                "method": _SPECULATIVE_METHOD,
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
}


def _generation_fields(models: tuple[str, ...], positions: int) -> dict[str, Any]:
    """The fields completions and chat share."""
    return {
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
        "quicksilver": _QUICKSILVER,
    }


def _json_body(fields: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema = {
        "type": "object",
        "properties": fields,
        "required": required,
        "additionalProperties": False,
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def request_schemas(
    models: tuple[str, ...], positions: int, vocab: int
) -> dict[str, dict[str, Any]]:
    """``openapi_extra`` for each POST route: "completion", "chat", "tokenize", "detokenize"."""
    token_ids = _array(_integer(0, vocab - 1), least=1)
    common = _generation_fields(models, positions)
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
    return {
        "completion": _json_body(completion, ["prompt"]),
        "chat": _json_body(chat, ["messages"]),
        "tokenize": _json_body(tokenize, []),
        "detokenize": _json_body({"tokens": _array(_integer(0, vocab - 1))}, ["tokens"]),
    }
