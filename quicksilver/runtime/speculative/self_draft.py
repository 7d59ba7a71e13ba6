"""Self-drafts: the same model, made cheaper, guesses the next tokens; the full model checks.

A ``DraftShape`` says which layers a draft forward runs and at what weight width;
``Engine.forward(..., draft=shape)`` runs exactly those (skipped layers are not called, so
their work never executes) and counts what ran. ``model_drafts`` feeds each drafting row's
last token, then its own guesses, one draft forward per drafted token (greedy: the argmax),
and rolls the cache back afterwards: the verify forward rewrites those positions with the
full model, so no draft K/V is ever read by anything but the draft itself.

Why the skipped layers' stale cache entries are harmless: inside one drafting round every
draft forward skips the same layers, so a skipped layer's entries at the drafted positions
are read by nobody; the round's positions are rolled back (``KVCache.truncate``) before the
verify forward writes them in every layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quicksilver.errors import QuicksilverError
from quicksilver.runtime.draft_shape import DraftShape
from quicksilver.runtime.sampling import greedy_tokens

if TYPE_CHECKING:  # types only: drafts run on the engine, which never imports drafting
    from quicksilver.runtime.cache import KVCache
    from quicksilver.runtime.engine import Engine

PLANE_DRAFT_BITS = 4  # the hi plane of the width-8 codes
PLANE_VERIFY_BITS = 8


def skip_layers(n_layers: int, skipped: tuple[int, ...] | list[int]) -> DraftShape:
    """The draft that runs every layer but ``skipped``."""
    bad = [layer for layer in skipped if not 0 <= layer < n_layers]
    if bad:
        raise QuicksilverError(
            f"a layer-skipping draft names layers {bad} outside this model's 0..{n_layers - 1}"
        )
    if len(set(skipped)) >= n_layers:
        raise QuicksilverError("a layer-skipping draft must run at least one layer")
    return DraftShape(layers=frozenset(range(n_layers)) - frozenset(skipped))


def exit_draft(n_layers: int, exit_layer: int) -> DraftShape:
    """The early-exit draft: layers 0..``exit_layer`` run, and the LM head reads their state
    through that layer's exit head (a model without fitted heads reads it as it is)."""
    if not 0 <= exit_layer < n_layers - 1:
        raise QuicksilverError(
            f"an early-exit draft must exit before the last layer: 0..{n_layers - 2}, got "
            f"{exit_layer}"
        )
    return DraftShape(layers=frozenset(range(exit_layer + 1)), exit_layer=exit_layer)


def plane_policy_error(policy) -> str | None:
    """Why method 'planes' cannot draft under ``policy`` (None: it can). It needs the stored
    width-8 Matryoshka codes and nothing else changing the forward; known from the policy
    alone, so a request is refused when it is checked, before any token."""
    mechanism = None if policy is None else policy.get("matryoshka")
    if mechanism is None or mechanism.fixed_bits != PLANE_VERIFY_BITS or len(policy.active) != 1:
        return (
            "speculative method 'planes' drafts with the 4-bit plane of Matryoshka width-8 "
            "weights: run it under the policy {'matryoshka': {'fixed_bits': 8}} (alone), or "
            "choose 'ngram', 'layers' or 'auto'"
        )
    return None


def plane_shape(engine: Engine) -> DraftShape:
    """The width-4 draft of a model running Matryoshka codes at width 8 through the int4
    planes kernel: every linear gets a width-4 product over the planes it already stores (the
    hi plane; nothing new is stored). Refused, in one line, anywhere else."""
    error = plane_policy_error(engine.policy)
    if error is not None:
        raise QuicksilverError(error)
    mechanism = engine.policy.get("matryoshka")
    for block in engine.model.blocks:
        for linear in (block.attn.qkv, block.attn.out, block.mlp.up, block.mlp.down):
            verify = linear.narrow.get(PLANE_VERIFY_BITS)
            if getattr(verify, "planes", None) is None:  # a dequantised (simulated) product
                raise QuicksilverError(
                    "speculative method 'planes' needs the int4 planes kernel on every linear "
                    "layer (this torch build or layer shape has none here); choose 'ngram' or "
                    "'layers'"
                )
            if PLANE_DRAFT_BITS not in linear.narrow:
                # the policy's own product type (policies sit above the runtime), one plane
                linear.narrow[PLANE_DRAFT_BITS] = type(verify)(
                    verify.planes, PLANE_DRAFT_BITS, verify.bias
                )
    return DraftShape(
        bits=PLANE_DRAFT_BITS,
        layer_bytes=mechanism.layer_weight_bytes(engine.config, PLANE_DRAFT_BITS),
    )


def model_drafts(
    engine: Engine, view: KVCache, last_tokens: list[int], k: int, shape: DraftShape
) -> list[list[int]]:
    """``k`` greedy draft tokens for each row of ``view`` (fed its last token first); the
    cache is left as it was (the round's slots rolled back)."""
    if k <= 0:
        return [[] for _ in last_tokens]
    feed = torch.tensor(last_tokens, dtype=torch.long).unsqueeze(1)
    columns = []
    for _ in range(k):
        logits = engine.forward(feed, view, logits_at="last", draft=shape)
        feed = greedy_tokens(logits).unsqueeze(-1)
        columns.append(feed)
    view.truncate(k)
    return torch.cat(columns, dim=1).tolist()
