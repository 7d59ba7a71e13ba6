"""How much a policy changes what the model generates, measured against the dense model.

For each prompt, greedy continuations from the dense engine and from the policy's engine
(same batch size, same prompts): how often the policy's token equals the dense token at the
same position (agreement), ROUGE-L F1 between the two token sequences, the dense model's
perplexity of each continuation (does the policy's text still read as likely to the full
model?), decode tokens/s and counted decode FLOPs per generated token of both. Decode steps
carry no padding (every row feeds one token), so the FLOP ratio compares like with like; the
prompt's FLOPs, which include left padding, are left out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from quicksilver.errors import QuicksilverError
from quicksilver.policies.stack import Policy
from quicksilver.runtime.engine import Engine
from quicksilver.runtime.generate import GenerationResult, generate
from quicksilver.scoring import forced_logits


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
    logits = teacher_forced_logits(engine, prompt, continuation)
    return summed_nll(logits, torch.tensor(list(continuation)))


def teacher_forced_logits(
    engine: Engine, prompt: Sequence[int], continuation: Sequence[int]
) -> torch.Tensor:
    """Logits predicting each token of ``continuation`` [T, V] from the one teacher-forced
    forward over prompt + continuation, with the prompt boundary set (what generation's step
    count starts from)."""
    sequence = [*prompt, *continuation]
    return forced_logits(engine, [sequence], len(prompt) - 1, prompt_ends=[len(prompt)])[0]


def summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed NLL (natural log) of ``targets`` [T] under ``logits`` [T, V]."""
    logits = logits.float()
    return float((torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None])[:, 0]).sum())


@dataclass
class ForcedVsDecoded:
    """A policy's perplexity of given continuations, computed the way `eval` does (one
    teacher-forced forward over prompt + continuation) and the way generation does (the
    prompt, then one token at a time through the KV cache), and the largest logit gap."""

    ppl_forced: float
    ppl_decoded: float
    max_logit_gap: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def forced_vs_decoded(
    engine: Engine, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
) -> ForcedVsDecoded:
    """Both ways for each prompt alone; the prompt boundary is set in both, so a schedule
    that depends on the generation step (SkipDecode) sees the same steps."""
    nll_forced = nll_decoded = 0.0
    gap, n_tokens = 0.0, 0
    for prompt, continuation in zip(prompts, continuations, strict=True):
        if not continuation:
            continue
        forced = teacher_forced_logits(engine, prompt, continuation)
        tokens = torch.tensor([list(prompt) + list(continuation)])
        n, total = len(prompt), tokens.shape[1]
        cache = engine.new_cache(1, total)
        cache.set_prompt_end(n)
        decoded = [engine.forward(tokens[:, :n], cache)[0]]
        decoded += [engine.forward(tokens[:, i : i + 1], cache)[0] for i in range(n, total - 1)]
        stepped = torch.stack(decoded)
        targets = tokens[0, n:]
        nll_forced += summed_nll(forced, targets)
        nll_decoded += summed_nll(stepped, targets)
        gap = max(gap, float((forced.float() - stepped.float()).abs().max()))
        n_tokens += len(continuation)
    if not n_tokens:
        raise QuicksilverError("no continuation tokens to score")
    return ForcedVsDecoded(math.exp(nll_forced / n_tokens), math.exp(nll_decoded / n_tokens), gap)


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
    policy_flops_per_token: float  # counted in decode steps, per token fed
    dense_flops_per_token: float
    # counted in the prompts' forward, per real prompt token; at batch > 1 the dense path
    # also runs (and counts) left padding, which the adaptive path never runs
    policy_prefill_flops_per_token: float
    dense_prefill_flops_per_token: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run(engine: Engine, batches: list[list[list[int]]], new: int) -> list[GenerationResult]:
    return [generate(engine, batch, new, ignore_eos=True) for batch in batches]


def _prefill_cost(results: list[GenerationResult]) -> float:
    flops = sum(r.flops["total"] - r.decode_flops["total"] for r in results)
    return flops / sum(r.prompt_tokens for r in results)


def _rate_and_cost(results: list[GenerationResult]) -> tuple[float, float]:
    fed = sum(len(r.tokens) * r.decode_steps for r in results)
    seconds = sum(r.decode_seconds for r in results)
    flops = sum(r.decode_flops["total"] for r in results)
    return (fed / seconds if seconds else 0.0), (flops / fed if fed else 0.0)


class DenseReference:
    """The dense model's greedy continuations of a prompt set, generated once, against which
    any number of policies are measured (`evaluate_generation` for one, calibration for many).
    No early stop, so every continuation has ``max_new_tokens`` tokens on both sides."""

    def __init__(
        self,
        model: Any,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 32,
        batch_size: int = 8,
    ) -> None:
        if not prompts:
            raise QuicksilverError("no prompts to generate from")
        if batch_size < 1:
            raise QuicksilverError(f"the batch size must be at least 1, got {batch_size}")
        if max_new_tokens < 2:
            raise QuicksilverError(
                f"comparing generation needs at least 2 new tokens, got {max_new_tokens}: the "
                "first comes from the prompt's forward, speed and FLOPs are measured on the rest"
            )
        self.model = model
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.batches = [
            list(map(list, prompts[i : i + batch_size])) for i in range(0, len(prompts), batch_size)
        ]
        self.engine = Engine(model)
        self.results = _run(self.engine, self.batches, max_new_tokens)
        self.continuations = [row for r in self.results for row in r.tokens]
        self.prompts = [prompt for batch in self.batches for prompt in batch]
        self.nll = self._nll(self.continuations)
        self.tokens_per_s, self.flops_per_token = _rate_and_cost(self.results)

    @property
    def ppl(self) -> float:
        """The dense model's perplexity of its own continuations."""
        return math.exp(self.nll / sum(map(len, self.continuations)))

    def _nll(self, continuations: list[list[int]]) -> float:
        return sum(
            dense_nll(self.engine, p, c) for p, c in zip(self.prompts, continuations, strict=True)
        )

    def measure(self, policy: Policy | None, model: Any = None) -> GenerationQuality:
        """Generate under ``policy`` (same prompts, batches and length) and compare. ``model``:
        who generates (default: the reference's own model), e.g. the same base model with a
        LoRA adapter merged, judged against the unadapted model's text and perplexity."""
        engine = Engine(self.model if model is None else model, policy=policy)
        try:
            results = _run(engine, self.batches, self.max_new_tokens)
        finally:
            engine.set_policy(None)  # release what the policy attached to the shared model
        mine = [row for r in results for row in r.tokens]
        n_tokens = sum(map(len, mine))
        pairs = list(zip(mine, self.continuations, strict=True))
        policy_rate, policy_cost = _rate_and_cost(results)
        return GenerationQuality(
            batch_size=self.batch_size,
            prompts=len(self.prompts),
            max_new_tokens=self.max_new_tokens,
            agreement=sum(agreement(m, t) for m, t in pairs) / len(pairs),
            rouge_l=sum(rouge_l(m, t) for m, t in pairs) / len(pairs),
            dense_ppl_of_policy=math.exp(self._nll(mine) / n_tokens),
            dense_ppl_of_dense=self.ppl,
            policy_tokens_per_s=policy_rate,
            dense_tokens_per_s=self.tokens_per_s,
            policy_flops_per_token=policy_cost,
            dense_flops_per_token=self.flops_per_token,
            policy_prefill_flops_per_token=_prefill_cost(results),
            dense_prefill_flops_per_token=_prefill_cost(self.results),
        )


def evaluate_generation(
    model: Any,
    policy: Policy,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> GenerationQuality:
    """Greedy generation by the dense model and, right after (so the speed ratio is from one
    run), under ``policy``, batch by batch."""
    reference = DenseReference(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return reference.measure(policy)
