"""Fitting exit heads (a tuned lens) on the frozen model.

One dense forward per batch gives every layer's states and the final distribution; each
layer's head is then fitted by KL(final || head's lens), layer by layer with a backward
each, so only one layer's [tokens, vocabulary] logits are alive at a time. A step fits
``layers_per_step`` layers in turn (round robin): the LM-head product per layer and token is
the whole cost, so every layer sees the same number of tokens for a given budget. Layers
before ``first_layer`` keep the identity (the plain logit lens): halting never checks there
(its ``min_layer``), so fitting them would only take tokens from the layers it reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from quicksilver.adapt.distill import distillation_loss
from quicksilver.adapt.exits import ExitHeads
from quicksilver.adapt.train import TrainingSettings, train
from quicksilver.adapt.workspace import AdapterResult, Workspace, open_workspace, write_result
from quicksilver.errors import QuicksilverError
from quicksilver.models.transformer import Transformer
from quicksilver.runtime.engine import Engine


def layer_states(engine: Engine, batch: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every layer's states [B, S, d] and the final logits of a dense forward, as ordinary
    tensors (made in inference mode, they could not feed a graph otherwise)."""
    states: list[torch.Tensor] = []
    cache = engine.new_cache(batch.shape[0], batch.shape[1])
    logits = engine.forward(
        batch, cache, logits_at="all", observe=lambda _, h: states.append(h.clone())
    )
    return [s.clone() for s in states], logits.clone()


def lens_logits(model: Transformer, heads: ExitHeads | None, h: torch.Tensor, layer: int):
    """The (tuned, when ``heads`` is given) logit lens of layer ``layer``'s states."""
    state = h if heads is None else heads(h, layer)
    return model.lm_head(model.final_hidden(state))


def fit_exit_heads(
    model: str | os.PathLike[str],
    settings: TrainingSettings | None = None,
    layers_per_step: int = 4,
    first_layer: int = 0,
    data: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> AdapterResult:
    """Fit one exit head per layer ``first_layer`` .. n_layers - 2 of frozen ``model``;
    write the adapter file."""
    settings = settings or TrainingSettings(lr=1e-3)
    settings.check()
    if layers_per_step < 1:
        raise QuicksilverError(f"layers_per_step must be >= 1, got {layers_per_step}")
    workspace = open_workspace(model, data, settings.seq_len)
    frozen = workspace.model
    heads = ExitHeads(frozen.config.n_layers, frozen.config.hidden_size)
    engine = Engine(frozen)
    last = frozen.config.n_layers - 1
    if not 0 <= first_layer < last:
        raise QuicksilverError(f"first_layer must be 0..{last - 1}, got {first_layer}")
    fitted = last - first_layer
    per_step = min(layers_per_step, fitted)

    def step_loss(step: int, batch: torch.Tensor) -> float:
        states, final = layer_states(engine, batch)
        first = step * per_step
        total = 0.0
        for layer in [first_layer + (first + i) % fitted for i in range(per_step)]:
            loss = distillation_loss(lens_logits(frozen, heads, states[layer], layer), final)
            (loss / per_step).backward()
            total += float(loss.detach()) / per_step
        return total

    before = _validate(workspace, engine, None)
    identity = {"kind": "exits", "base": workspace.base_sha256, "per_step": per_step}
    if first_layer:
        identity["first_layer"] = first_layer  # absent at 0: older checkpoints still resume
    identity["data"] = workspace.data
    path = None if checkpoint is None else Path(checkpoint)
    run = train(heads, step_loss, workspace.windows, settings, identity, path, progress)
    details = {
        "layers": list(range(first_layer, last)),
        "layers_per_step": per_step,
        "validation_kl_by_layer": {
            "logit_lens": before,
            "exit_heads": _validate(workspace, engine, heads),
        },
    }
    tensors = {"exit_heads.weight": heads.weight, "exit_heads.bias": heads.bias}
    return write_result(workspace, "exits", tensors, details, settings, run, output)


@torch.no_grad()
def _validate(workspace: Workspace, engine: Engine, heads: ExitHeads | None) -> list[float]:
    """Mean KL(final || lens) per layer on the held-out windows (``heads`` None: the raw
    logit lens)."""
    model = workspace.model
    batches = workspace.validation_batches(2)
    totals = [0.0] * (model.config.n_layers - 1)
    for batch in batches:
        states, final = layer_states(engine, batch)
        for layer in range(len(totals)):
            lens = lens_logits(model, heads, states[layer], layer)
            totals[layer] += float(distillation_loss(lens, final)) / len(batches)
    return [round(value, 4) for value in totals]
