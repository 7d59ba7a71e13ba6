"""Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quicksilver.errors import QuicksilverError


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token. The defaults are greedy decoding."""

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    seed: int | None = None  # None uses torch's global RNG

    def __post_init__(self) -> None:
        # Checked up front so a bad CLI flag fails before a model is loaded.
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise QuicksilverError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise QuicksilverError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise QuicksilverError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """True when the choice is always the argmax (top_k=1 keeps only the argmax too)."""
        return self.temperature == 0 or self.top_k == 1


def make_generator(
    config: SamplingConfig, device: torch.device | str = "cpu"
) -> torch.Generator | None:
    """A seeded generator for reproducible sampling, or None to use the global RNG.

    `device` must match the logits' device, because torch.multinomial needs a generator there.
    """
    if config.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)
    return generator


def sample_next(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick one token per row: logits [B, V] (any float dtype) -> token ids [B] (int64).

    Filtering works row by row, and torch.multinomial draws the same amount of randomness for
    each row, so row b's token depends only on row b's logits and the generator state.
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape [batch, vocab], got {tuple(logits.shape)}")
    if config.greedy:
        return logits.argmax(dim=-1)

    scores = logits.float() / config.temperature
    vocab = scores.shape[-1]
    if 0 < config.top_k < vocab:
        # Ties with the k-th score are kept, so a row can keep slightly more than k tokens.
        kth = torch.topk(scores, config.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top token has
        # nothing above it, so it always survives.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        sorted_scores = sorted_scores.masked_fill(mass_before >= config.top_p, -math.inf)
        scores = torch.empty_like(scores).scatter_(-1, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
