"""Which drafted tokens the full model keeps: one rule for greedy and sampled rows."""

from __future__ import annotations

import torch

from quicksilver.runtime.sampling import SamplingConfig, probabilities


def accept_drafts(
    logits: torch.Tensor,
    draft: list[int],
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Verify one row's drafted tokens against the model's logits at the fed positions
    ([len(draft) + 1 or more, V]: position j predicts the token after the j-th fed one).

    Returns (drafted tokens accepted, the token the model adds after them). Greedy accepts
    while the draft equals the argmax. Sampling uses the lossless rule for a drafter that
    proposes one token with certainty: accept it with probability p(token) (= min(1, p/q) for
    q = 1), else draw from p with that token removed and renormalised (= max(0, p - q)); the
    emitted tokens are then distributed exactly as plain sampling's.
    """
    if sampling.greedy:
        best = logits[: len(draft) + 1].argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(draft) and draft[accepted] == best[accepted]:
            accepted += 1
        return accepted, best[accepted]
    probs = probabilities(logits[: len(draft) + 1], sampling)
    for position, token in enumerate(draft):
        p = probs[position]
        if float(torch.rand((), generator=generator, dtype=torch.float64)) < float(p[token]):
            continue
        residual = p.clone()
        residual[token] = 0.0
        total = float(residual.sum())
        if total <= 0.0:  # p was all on the drafted token: it cannot be rejected
            continue
        return position, int(torch.multinomial(residual / total, 1, generator=generator))
    bonus = torch.multinomial(probs[len(draft)], 1, generator=generator)
    return len(draft), int(bonus)
