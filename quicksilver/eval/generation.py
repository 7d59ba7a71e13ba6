"""How much a policy changes what the model generates, measured against the dense model.

For each prompt, greedy continuations from the dense engine and from the policy's engine
(same batch size, same prompts): how often the policy's token equals the dense token at the
same position (agreement), ROUGE-L F1 between the two token sequences, the dense model's
perplexity of each continuation (does the policy's text still read as likely to the full
model?), decode tokens/s and counted FLOPs per generated token of both.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from quicksilver.errors import QuicksilverError
from quicksilver.policies.stack import PolicyStack
from quicksilver.runtime.engine import Engine, GenerationResult


def wikitext_prompts(text: str, n: int, min_words: int = 6) -> list[str]:
    """The first sentence of each of the first ``n`` body paragraphs (headings skipped)."""
    prompts = []
    for paragraph in text.split("\n"):
        line = paragraph.strip()
        if not line or line.startswith("="):
            continue
        sentence = re.split(r"(?<=[.!?]) ", line, maxsplit=1)[0]
        if len(sentence.split()) >= min_words:
            prompts.append(sentence)
        if len(prompts) == n:
            break
    return prompts


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Longest common subsequence, the dynamic programme row by row."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F1 over tokens (1.0 for two empty sequences)."""
    if not candidate and not reference:
        return 1.0
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def agreement(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """Share of the reference's positions where the candidate has the same token."""
    if not reference:
        return 1.0
    return sum(c == r for c, r in zip(candidate, reference, strict=False)) / len(reference)


@torch.inference_mode()
def dense_nll(engine: Engine, prompt: Sequence[int], continuation: Sequence[int]) -> float:
    """The dense model's summed NLL of ``continuation`` after ``prompt`` (natural log)."""
    if not continuation:
        return 0.0
    tokens = torch.tensor([list(prompt) + list(continuation)])
    cache = engine.new_cache(1, tokens.shape[1])
    columns = torch.arange(len(prompt) - 1, tokens.shape[1] - 1)
    logits = engine.forward(tokens, cache, logits_at=columns)[0].float()
    targets = torch.tensor(list(continuation))
    return float((torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None])[:, 0]).sum())


@dataclass
class GenerationQuality:
    batch_size: int
    prompts: int
    max_new_tokens: int
    agreement: float  # mean over prompts
    rouge_l: float  # mean over prompts
    dense_ppl_of_policy: float  # the dense model's perplexity of the policy's continuations
    dense_ppl_of_dense: float  # ... and of its own
    policy_tokens_per_s: float
    dense_tokens_per_s: float
    policy_flops_per_token: float  # counted, prefill and decode, per token that went in
    dense_flops_per_token: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run(engine: Engine, batches: list[list[list[int]]], new: int) -> list[GenerationResult]:
    return [engine.generate(batch, new, stop_ids=[]) for batch in batches]


def _rate_and_cost(results: list[GenerationResult]) -> tuple[float, float]:
    tokens = sum(len(r.tokens) * r.decode_steps for r in results)
    seconds = sum(r.decode_seconds for r in results)
    fed = sum(r.prompt_tokens + len(r.tokens) * r.decode_steps for r in results)
    flops = sum(r.flops["total"] for r in results)
    return (tokens / seconds if seconds else 0.0), flops / fed


def evaluate_generation(
    model: Any,
    policy: PolicyStack,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> GenerationQuality:
    """Greedy generation of ``max_new_tokens`` (no early stop, so both sides produce the same
    number of tokens) by the dense model and under ``policy``, batch by batch."""
    if not prompts:
        raise QuicksilverError("no prompts to generate from")
    if batch_size < 1 or max_new_tokens < 1:
        raise QuicksilverError("batch size and new tokens must be at least 1")
    batches = [
        list(map(list, prompts[i : i + batch_size])) for i in range(0, len(prompts), batch_size)
    ]
    dense_engine = Engine(model)
    policy_engine = Engine(model, policy=policy)
    dense = _run(dense_engine, batches, max_new_tokens)
    adaptive = _run(policy_engine, batches, max_new_tokens)
    pairs = [
        (prompt, mine, theirs)
        for batch, d, a in zip(batches, dense, adaptive, strict=True)
        for prompt, theirs, mine in zip(batch, d.tokens, a.tokens, strict=True)
    ]
    n_tokens = sum(len(mine) for _, mine, _ in pairs)
    nll_policy = sum(dense_nll(dense_engine, p, mine) for p, mine, _ in pairs)
    nll_dense = sum(dense_nll(dense_engine, p, theirs) for p, _, theirs in pairs)
    policy_rate, policy_cost = _rate_and_cost(adaptive)
    dense_rate, dense_cost = _rate_and_cost(dense)
    return GenerationQuality(
        batch_size=batch_size,
        prompts=len(prompts),
        max_new_tokens=max_new_tokens,
        agreement=sum(agreement(m, t) for _, m, t in pairs) / len(pairs),
        rouge_l=sum(rouge_l(m, t) for _, m, t in pairs) / len(pairs),
        dense_ppl_of_policy=math.exp(nll_policy / n_tokens),
        dense_ppl_of_dense=math.exp(nll_dense / n_tokens),
        policy_tokens_per_s=policy_rate,
        dense_tokens_per_s=dense_rate,
        policy_flops_per_token=policy_cost,
        dense_flops_per_token=dense_cost,
    )
