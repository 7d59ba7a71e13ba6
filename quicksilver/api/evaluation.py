"""Scoring entry points of ``LLM``: sliding-window perplexity and lm-evaluation-harness's
log-likelihood requests, both through the one teacher-forced forward (``scoring``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from quicksilver.api.arguments import PolicySpec, count, flag, integer
from quicksilver.api.records import LogLikelihood
from quicksilver.errors import InvalidArgument, QuicksilverError
from quicksilver.eval.datasets import EvalText
from quicksilver.eval.perplexity import PerplexityResult, check_windows, evaluate_perplexity
from quicksilver.scoring import TokenScores, rolling_loglikelihood, score_tokens
from quicksilver.text import encode_prompt, encode_stream

if TYPE_CHECKING:
    from quicksilver.api.llm import LLM


def perplexity(
    llm: LLM,
    text: str | Sequence[int],
    context: Any,
    stride: Any,
    batch_size: Any,
    max_windows: Any,
    progress: Any,
    policy: PolicySpec,
) -> PerplexityResult:
    """``LLM.perplexity``: types checked here, ranges by ``check_windows`` (the rule
    ``evaluate_perplexity`` applies), all before any work."""
    context = integer("context", context)
    stride = integer("stride", stride)
    batch_size = integer("batch_size", batch_size)
    max_windows = None if max_windows is None else integer("max_windows", max_windows)
    progress = flag("progress", progress)
    if isinstance(text, str):
        if not text:
            raise InvalidArgument("text is empty: there is nothing to score")
        try:
            ids = encode_stream(llm.inputs.text_tokenizer(), text)
        except QuicksilverError as err:
            raise InvalidArgument(str(err)) from None
        llm.inputs.ids(ids, "text")
        source = EvalText(
            name="text",
            text=text,
            n_bytes=len(text.encode("utf-8")),
            n_words=len(re.split(r"\s+", text)),  # lm-evaluation-harness's count
            n_documents=1,
        )
    else:
        ids, source = llm.inputs.ids(text, "text"), None
    try:
        check_windows(
            llm.config.max_position_embeddings, len(ids), context, stride, batch_size, max_windows
        )
    except QuicksilverError as err:
        raise InvalidArgument(str(err)) from None
    with llm.access.work(policy):
        return evaluate_perplexity(
            llm.engine,
            ids,
            context=context,
            stride=stride,
            text=source,
            batch_size=batch_size,
            progress=progress,
            max_windows=max_windows,
        )


def loglikelihoods(
    llm: LLM, pairs: Sequence[tuple[str, str]], policy: PolicySpec, batch_size: Any
) -> list[LogLikelihood]:
    """``LLM.loglikelihoods`` (its docstring has the tokenisation rules)."""
    batch_size = count("batch_size", batch_size)
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise InvalidArgument("pairs must be a list of (context, continuation) pairs")
    requests = [_scoring_request(llm, i, pair) for i, pair in enumerate(pairs)]
    # Longest first, so each forward pads little and a too-large batch fails at once.
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    results: list[LogLikelihood | None] = [None] * len(requests)
    with llm.access.work(policy):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            sequences = [requests[i][0] for i in chunk]
            firsts = [len(requests[i][0]) - requests[i][1] for i in chunk]
            for i, scored in zip(chunk, score_tokens(llm.engine, sequences, firsts), strict=True):
                results[i] = LogLikelihood(
                    logprob=scored.total, is_greedy=scored.is_greedy, tokens=requests[i][1]
                )
    return [r for r in results if r is not None]


def _scoring_request(llm: LLM, index: int, pair: Any) -> tuple[list[int], int]:
    """(token ids of context + continuation, continuation length) for one pair."""
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(s, str) for s in pair)
    ):
        raise InvalidArgument(
            f"pair {index} must be a (context, continuation) pair of strings, got {pair!r}"
        )
    context, continuation = pair
    if not continuation:
        raise InvalidArgument(f"pair {index}: the continuation is empty; nothing to score")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    tokenizer = llm.inputs.text_tokenizer()
    try:
        whole = llm.inputs.ids(encode_prompt(tokenizer, context + continuation), "the text")
        context_ids = encode_prompt(tokenizer, context)
    except QuicksilverError as err:
        raise InvalidArgument(str(err)) from None
    continuation_ids = whole[len(context_ids) :]
    if not context_ids:
        context_ids = [llm.prefix_token_id]
    if not continuation_ids:
        raise InvalidArgument(f"pair {index}: the continuation encodes to no tokens")
    positions = llm.config.max_position_embeddings
    if len(continuation_ids) > positions:
        raise InvalidArgument(
            f"pair {index}: the continuation has {len(continuation_ids)} tokens, more "
            f"than the model's {positions} positions"
        )
    # The model sees all but the last token: keep at most positions + 1.
    return (context_ids + continuation_ids)[-(positions + 1) :], len(continuation_ids)


def token_scores(
    llm: LLM,
    sequences: Sequence[Sequence[int]],
    firsts: Sequence[int] | None,
    top: Any,
    policy: PolicySpec,
) -> list[TokenScores]:
    """``LLM.token_scores``: ids checked, then the one teacher-forced forward."""
    checked = [llm.inputs.ids(s, f"sequence {i}") for i, s in enumerate(sequences)]
    top = integer("top", top)
    try:
        with llm.access.work(policy):
            return score_tokens(llm.engine, checked, firsts, top=top)
    except QuicksilverError as err:
        raise InvalidArgument(str(err)) from None


def rolling(
    llm: LLM, ids: Sequence[int], max_length: Any, batch_size: Any, policy: PolicySpec
) -> float:
    """``LLM.rolling_loglikelihood``: ids and sizes checked, then the harness's windows."""
    checked = llm.inputs.ids(ids, "ids")
    max_length, batch_size = count("max_length", max_length), count("batch_size", batch_size)
    with llm.access.work(policy):
        return rolling_loglikelihood(
            llm.engine,
            checked,
            prefix_token=llm.prefix_token_id,
            max_length=max_length,
            batch_size=batch_size,
        )
