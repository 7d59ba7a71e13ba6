"""Which drafted tokens the full model keeps: one rule for greedy and sampled rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quicksilver.runtime.sampling import SamplingConfig, sample_tokens


def accept_drafts(
    logits: torch.Tensor,
    draft: list[int],
    sampling: SamplingConfig,
    uniforms: Sequence[float],
) -> tuple[int, int]:
    """Verify one row's drafted tokens against the model's logits at the fed positions
    ([len(draft) + 1 or more, V]: position j predicts the token after the j-th fed one),
    ``uniforms[j]`` being the row's uniform for the token at fed position j.

    Returns (drafted tokens accepted, the token the model adds after them): the draft is
    accepted while each drafted token is the token plain decoding picks at its position —
    the argmax, or, sampling, the inverse-CDF draw at that position's uniform. For a drafter
    that proposes one token with certainty (q = 1) this is the lossless rejection rule:
    the drafted token d is accepted with probability p(d) (u falls in d's interval) and
    otherwise the emitted token is the draw at u outside that interval, distributed as p
    with d removed and renormalised (max(0, p - q)). And it is the same draw plain sampling
    makes, so a seeded row gives the same tokens with drafts and without.
    """
    count = len(draft) + 1
    plain = sample_tokens(logits[:count], sampling, list(uniforms[:count])).tolist()
    accepted = 0
    while accepted < len(draft) and draft[accepted] == plain[accepted]:
        accepted += 1
    return accepted, plain[accepted]
