"""Response bodies and stream chunks in OpenAI's formats, from the worker's results.

Kept apart from the HTTP layer so that the shapes clients parse (``choices``, ``logprobs``,
``usage``, the chunk objects) are in one place and the same for plain and streamed answers.
Every response also carries a top-level ``quicksilver`` object: the counted FLOPs, the dense
FLOPs of the same tokens, their ratio and the timings, which no other server reports.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import quicksilver as qs
from quicksilver.serve.protocol import GenerationSpec
from quicksilver.serve.scheduler import ChoiceResult, JobResult


def new_id(kind: str) -> str:
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(result: JobResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _token_text(llm: qs.LLM, token: int) -> str:
    """One token's text as clients expect it in log-prob lists (special tokens shown)."""
    return llm.tokenizer.decode([token], skip_special_tokens=False)


def completion_logprobs(llm: qs.LLM, spec: GenerationSpec, choice: ChoiceResult) -> dict:
    """OpenAI's legacy completions ``logprobs``: tokens, their log-probs, the top
    alternatives at each (the chosen token included, as vLLM does) and text offsets. With
    ``echo`` the prompt's tokens come first, the very first with null (nothing predicts it).
    """
    ids = choice.scored_ids
    first = 0 if spec.echo else len(ids) - len(choice.token_ids)
    scores = choice.scores
    tokens = [_token_text(llm, t) for t in ids[first:]]
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    for position in range(first, len(ids)):
        k = position - scores.first if scores is not None else -1
        if k < 0:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        chosen = scores.logprobs[k]
        alternatives: dict[str, float] = {}
        # Best first; tokens whose texts coincide (bytes of one character) keep the best.
        for token, value in [*scores.top[k][: spec.logprobs], (ids[position], chosen)]:
            alternatives.setdefault(_token_text(llm, token), value)
        token_logprobs.append(chosen)
        top_logprobs.append(alternatives)
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def chat_logprobs(llm: qs.LLM, spec: GenerationSpec, choice: ChoiceResult) -> dict | None:
    """Chat's ``logprobs.content``: one entry per generated token."""
    scores = choice.scores
    if scores is None:
        return {"content": []}

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(llm, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for k, token in enumerate(choice.token_ids):
        item = entry(token, scores.logprobs[k])
        item["top_logprobs"] = [entry(t, v) for t, v in scores.top[k][: spec.logprobs]]
        content.append(item)
    return {"content": content}


def completion_body(
    llm: qs.LLM, spec: GenerationSpec, result: JobResult, rid: str, created: int
) -> dict:
    choices = []
    for choice in result.choices:
        text = choice.text
        if spec.echo:
            text = spec.prompt_texts[choice.prompt_index] + text
        logprobs = None
        if spec.logprobs is not None:
            logprobs = completion_logprobs(llm, spec, choice)
        choices.append(
            {
                "index": choice.index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": choice.finish_reason,
            }
        )
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": spec.model,
        "choices": choices,
        "usage": usage(result),
        "quicksilver": result.quicksilver,
    }


def chat_body(llm: qs.LLM, spec: GenerationSpec, result: JobResult, rid: str, created: int) -> dict:
    choices = [
        {
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": chat_logprobs(llm, spec, choice) if spec.logprobs is not None else None,
            "finish_reason": choice.finish_reason,
        }
        for choice in result.choices
    ]
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": spec.model,
        "choices": choices,
        "usage": usage(result),
        "quicksilver": result.quicksilver,
    }


class ChunkMaker:
    """The chunks of one streamed answer, in OpenAI's ``*.chunk`` shapes."""

    def __init__(self, spec: GenerationSpec, llm: qs.LLM | None = None) -> None:
        self.spec = spec
        self.llm = llm
        self.id = new_id(spec.kind)
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if spec.kind == "chat" else "text_completion"

    def _chunk(self, choices: list[dict], **extra: Any) -> dict:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.spec.model,
            "choices": choices,
            **extra,
        }

    def opening(self) -> list[dict]:
        """Chat streams open with each choice's role; completions need no opening."""
        if self.spec.kind != "chat":
            return []
        return [
            self._chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(self.spec.rows)
                ]
            )
        ]

    def text(self, index: int, piece: str, scores: tuple | None = None) -> dict:
        """A piece of text; with ``scores`` (token ids, their log-probs, alternatives) the
        tokens of this step and their log-probs, in the plain answer's shape."""
        logprobs = None
        if scores is not None and self.llm is not None:
            logprobs = self._logprobs(*scores)
        if self.spec.kind == "chat":
            choice = {"index": index, "delta": {"content": piece}, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": piece, "logprobs": logprobs}
        return self._chunk([{**choice, "finish_reason": None}])

    def _logprobs(self, tokens: list[int], values: list[float], top: list) -> dict:
        llm, k = self.llm, self.spec.logprobs or 0
        if self.spec.kind == "chat":

            def entry(token: int, logprob: float) -> dict[str, Any]:
                text = _token_text(llm, token)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

            content = []
            for token, value, alternatives in zip(tokens, values, top, strict=False):
                item = entry(token, value)
                item["top_logprobs"] = [entry(t, v) for t, v in alternatives[:k]]
                content.append(item)
            return {"content": content}
        texts = [_token_text(llm, t) for t in tokens]
        top_logprobs = []
        for token, value, alternatives in zip(tokens, values, top, strict=False):
            best: dict[str, float] = {}
            for t, v in [*alternatives[:k], (token, value)]:
                best.setdefault(_token_text(llm, t), v)
            top_logprobs.append(best)
        return {"tokens": texts, "token_logprobs": list(values), "top_logprobs": top_logprobs}

    def echo(self, index: int, prompt_text: str) -> dict:
        return self.text(index, prompt_text)

    def closing(self, result: JobResult) -> list[dict]:
        """A finish chunk per choice, then (if asked) the usage chunk with no choices; the
        last chunk carries the ``quicksilver`` object."""
        chunks = []
        for choice in result.choices:
            if self.spec.kind == "chat":
                item = {"index": choice.index, "delta": {}, "logprobs": None}
            else:
                item = {"index": choice.index, "text": "", "logprobs": None}
            chunks.append(self._chunk([{**item, "finish_reason": choice.finish_reason}]))
        if self.spec.include_usage:
            chunks.append(self._chunk([], usage=usage(result)))
        chunks[-1]["quicksilver"] = result.quicksilver
        return chunks
