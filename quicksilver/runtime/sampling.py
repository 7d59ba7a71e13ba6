"""Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling.

Every finite, valid setting gives a valid token, including extreme ones (``temperature=1e-45``,
``top_p=1e-300``): scores are shifted so the best token scores exactly 0 before the temperature
divides them, the arithmetic runs in float64, and the best token survives every filter.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from quicksilver.errors import QuicksilverError

# torch.Generator.manual_seed takes any 64-bit value, signed or unsigned.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def _real(name: str, value: Any, rule: str) -> float:
    """``value`` as a float, or a QuicksilverError naming the option (bool, text, None, a
    tensor or an int too large for a float are all refused here, not deep inside torch)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise QuicksilverError(f"{name} must be {rule}, got {value!r} ({type(value).__name__})")
    try:
        number = float(value)
    except (OverflowError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise QuicksilverError(f"{name} must be {rule}, got {value!r}")
    return number


def _integer(name: str, value: Any, rule: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise QuicksilverError(f"{name} must be {rule}, got {value!r} ({type(value).__name__})")
    return int(value)


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token. The defaults are greedy decoding.

    Values are checked and normalised (to float / int) on construction, so a bad CLI flag or
    API argument fails before a model is loaded. Options that cannot change the outcome (e.g.
    ``top_p`` with ``temperature=0``) are accepted; ``ignored()`` names them so that callers
    can tell the user instead of silently dropping them.
    """

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    seed: int | None = None  # None uses torch's global RNG

    def __post_init__(self) -> None:
        temperature = _real("temperature", self.temperature, "a finite number >= 0 (0 = greedy)")
        if temperature < 0:
            raise QuicksilverError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}"
            )
        top_k = _integer("top_k", self.top_k, "an integer >= 0 (0 = off)")
        if top_k < 0:
            raise QuicksilverError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        top_p = _real("top_p", self.top_p, "a number in (0, 1] (1 = off)")
        if not 0 < top_p <= 1:
            raise QuicksilverError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        seed = self.seed
        if seed is not None:
            seed = _integer("seed", seed, "an integer or None")
            if not SEED_MIN <= seed <= SEED_MAX:
                raise QuicksilverError(
                    f"seed must be an integer from -2**63 to 2**64-1, got {self.seed}"
                )
        # Normalised so that equal settings compare equal (1 == 1.0 == numpy.float64(1)).
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_k", top_k)
        object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "seed", seed)

    @property
    def greedy(self) -> bool:
        """True when the choice is always the argmax (top_k=1 keeps only the argmax too)."""
        return self.temperature == 0 or self.top_k == 1

    def ignored(self, vocab_size: int | None = None) -> list[str]:
        """The options that were set but cannot change which token is picked.

        With ``temperature=0`` the argmax is taken, so ``top_k``, ``top_p`` and ``seed`` do
        nothing; with ``top_k=1`` only the argmax survives, so ``temperature``, ``top_p`` and
        ``seed`` do nothing; a ``top_k`` of at least ``vocab_size`` (when given) keeps every
        token. Defaults are never listed. Callers print these as a note (see
        ``ignored_note``) rather than fail, since such settings are harmless but likely a
        mistake.
        """
        names = []
        if self.temperature == 0:
            names += ["top_k"] if self.top_k != 0 else []
        elif self.top_k == 1:
            names.append("temperature")
        elif vocab_size is not None and self.top_k >= vocab_size:
            names.append("top_k")
        if self.greedy:
            names += ["top_p"] if self.top_p != 1.0 else []
            names += ["seed"] if self.seed is not None else []
        return names

    def ignored_note(self, vocab_size: int | None = None) -> str | None:
        """One line for the user about ``ignored()`` options, or None when there are none."""
        names = self.ignored(vocab_size)
        if not names:
            return None
        if self.temperature == 0:
            why = "temperature 0 means greedy decoding (always the most likely token)"
        elif self.top_k == 1:
            why = "top_k 1 keeps only the most likely token"
        else:
            why = f"top_k {self.top_k} keeps the whole vocabulary of {vocab_size} tokens"
        verb = "has" if len(names) == 1 else "have"
        return f"{', '.join(names)} {verb} no effect: {why}"


# A row's randomness is a pure function of (its key, the position of the token drawn): the same
# uniform at a position whatever else ran before it, so speculation and batch-mates cannot
# change a seeded row's text (see ``sample_tokens`` and the verified-decoding acceptance rule).
_MASK64 = 2**64 - 1


def _mix64(value: int) -> int:
    """SplitMix64's finaliser: a bijection on 64-bit integers whose outputs look independent
    for inputs that differ in one bit (consecutive positions, consecutive seeds)."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def draw_key(seed: int | None, index: int = 0) -> int:
    """The key of one row's random stream: from its seed and its index among the rows of one
    request (so ``n`` copies of a seeded prompt draw different text, reproducibly). Without
    a seed the key comes from torch's global generator, so ``torch.manual_seed`` still
    repeats a run."""
    if seed is None:
        seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
    return _mix64(_mix64(seed & _MASK64) ^ (index & _MASK64))


def uniform_at(key: int, position: int) -> float:
    """The uniform in [0, 1) that the token at ``position`` (its index among the row's
    generated tokens) is drawn with: 53 random bits, a float64's whole mantissa."""
    return (_mix64(key ^ _mix64(position & _MASK64)) >> 11) * 2.0**-53


def sample_tokens(
    logits: torch.Tensor, config: SamplingConfig, uniforms: Sequence[float]
) -> torch.Tensor:
    """Pick one token per row: logits [B, V] (any float dtype) -> token ids [B] (int64).

    Each row draws by inverse CDF with its own uniform: the token whose interval of the
    cumulative distribution (in token-id order) holds ``u``. So a row's token depends only on
    its logits and its uniform, and a drafted token is accepted exactly when it is the token
    this draw gives (``accept_drafts``), which makes verified sampling the same draw as plain
    sampling. Non-finite logits mean the model is broken (overflow in half precision,
    damaged weights); they raise a QuicksilverError instead of yielding an arbitrary token.
    """
    check_logits(logits)
    if config.greedy:
        return greedy_tokens(logits)
    if len(uniforms) != logits.shape[0]:
        raise ValueError(f"{len(uniforms)} uniforms for {logits.shape[0]} rows")
    return inverse_cdf(probabilities(logits, config), uniforms)


def inverse_cdf(probs: torch.Tensor, uniforms: Sequence[float]) -> torch.Tensor:
    """For each row of ``probs`` [B, V] the token whose cumulative interval holds its uniform
    (scaled to the row's total, so rounding in the sum cannot push ``u`` past the end); a
    token of probability 0 is never chosen."""
    cdf = probs.cumsum(dim=-1)
    target = torch.tensor(uniforms, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
    chosen = torch.searchsorted(cdf, target, right=True)[:, 0]
    # The last token with mass: where rounding leaves the target at or past the total.
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(dim=-1)
    return torch.minimum(chosen, last)


class NonFiniteLogits(QuicksilverError):
    """The model's logits hold NaN or inf: no token can be chosen."""


def check_logits(logits: torch.Tensor) -> None:
    """[B, V] finite logits, or a NonFiniteLogits naming the likely causes.

    Checked on every generated token, so it must cost little: the sum of the logits (in
    float32) is finite whenever every logit is, and NaN or inf when one is not; only a sum
    that overflows from finite values needs the element-wise check. (``isfinite(...).all()``
    on a bfloat16 vocabulary took ~1 ms a token here: abs, eq and ne, each unvectorised.)"""
    if logits.dim() != 2 or logits.shape[-1] == 0:
        raise ValueError(f"expected logits of shape [batch, vocab], got {tuple(logits.shape)}")
    if bool(torch.isfinite(logits.sum(dtype=torch.float32))):
        return
    if not bool(torch.isfinite(logits.float()).all()):
        raise NonFiniteLogits(
            "the model produced NaN/inf logits, so no token can be chosen; its weights may "
            "be damaged or overflow in this dtype (try --dtype float32 or another checkpoint)"
        )


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row of [..., V] logits (the first of equal best, as ``argmax``),
    taken in float32: torch's bfloat16 argmax over a vocabulary is several times slower than
    converting first, and the conversion is exact."""
    return logits.float().argmax(dim=-1)


def probabilities(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The distribution plain sampling draws from: [B, V] float64 after temperature, top-k
    and top-p (greedy: all mass on the argmax). Verified decoding accepts and resamples
    drafted tokens against exactly this distribution, so it stays lossless."""
    if config.greedy:
        probs = torch.zeros(logits.shape, dtype=torch.float64)
        return probs.scatter_(-1, greedy_tokens(logits).unsqueeze(-1), 1.0)
    # Shift so the best token scores 0: dividing by a tiny temperature then sends the others
    # to -inf (probability 0) instead of sending the best to +inf (NaN after softmax). float64
    # keeps temperatures and top_p values below float32's range from rounding to 0.
    scores = logits.double()
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / config.temperature
    vocab = scores.shape[-1]
    if 0 < config.top_k < vocab:
        # Ties with the k-th score are kept, so a row can keep slightly more than k tokens.
        kth = torch.topk(scores, config.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top token is
        # kept explicitly, whatever rounding does to the cumulative sum.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop = mass_before >= config.top_p
        drop[:, 0] = False
        sorted_scores = sorted_scores.masked_fill(drop, -math.inf)
        scores = torch.empty_like(scores).scatter_(-1, order, sorted_scores)
    return torch.softmax(scores, dim=-1)
