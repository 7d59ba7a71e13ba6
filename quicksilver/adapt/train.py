"""The training loop every adapter shares: seeded, resumable, with a progress bar.

A kind of adapter supplies its trainable module and ``step_loss(step, batch) -> float``, which
computes the loss of one batch and back-propagates it (exit heads back-propagate layer by
layer to bound memory, so the loop cannot do it for them). Everything else is here: AdamW on
the adapter's parameters only (the model stays frozen), gradient clipping, the loss curve,
tokens/s, and a checkpoint (parameters, optimizer state, curve) that a later run resumes
from, giving the same result as an uninterrupted run since each step's batch depends only
on the seed and the step.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from quicksilver.adapt.data import TokenWindows
from quicksilver.errors import QuicksilverError

CLIP_NORM = 1.0


@dataclass(frozen=True)
class TrainingSettings:
    steps: int = 200
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 5e-4
    seed: int = 0
    checkpoint_every: int = 25

    def check(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise QuicksilverError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise QuicksilverError(f"seq_len must be >= 2, got {self.seq_len}")
        if not self.lr > 0:
            raise QuicksilverError(f"the learning rate must be > 0, got {self.lr}")


@dataclass
class TrainingRun:
    """What a finished run reports (and its record keeps)."""

    losses: list[float]
    tokens: int
    seconds: float


def train(
    adapter: nn.Module,
    step_loss: Callable[[int, torch.Tensor], float],
    windows: TokenWindows,
    settings: TrainingSettings,
    identity: dict,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> TrainingRun:
    """Run ``settings.steps`` steps on ``adapter``'s parameters, resuming from
    ``checkpoint`` when it exists and was made by the same settings (``identity``: what else
    must match, e.g. the kind and the base model)."""
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=settings.lr, weight_decay=0.0)
    identity = {**identity, **dataclasses.asdict(settings)}
    run, start = TrainingRun([], 0, 0.0), 0
    if checkpoint is not None and checkpoint.exists():
        start = _resume(checkpoint, adapter, optimizer, run, identity)
    bar = tqdm(total=settings.steps, initial=start, disable=not progress, unit="step")
    for step in range(start, settings.steps):
        began = time.perf_counter()
        batch = windows.batch(step, settings.batch_size, settings.seed)
        optimizer.zero_grad(set_to_none=True)
        loss = step_loss(step, batch)
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), CLIP_NORM)
        optimizer.step()
        seconds = time.perf_counter() - began
        run.losses.append(loss)
        run.tokens += batch.numel()
        run.seconds += seconds
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tokens_per_s=f"{batch.numel() / seconds:.0f}")
        done = step + 1
        if checkpoint is not None and (
            done % settings.checkpoint_every == 0 or done == settings.steps
        ):
            _save(checkpoint, adapter, optimizer, run, identity, done)
    bar.close()
    return run


def _save(
    path: Path,
    adapter: nn.Module,
    optimizer: torch.optim.Optimizer,
    run: TrainingRun,
    identity: dict,
    step: int,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    state = {
        "identity": identity,
        "step": step,
        "adapter": adapter.state_dict(),
        "optimizer": optimizer.state_dict(),
        "run": dataclasses.asdict(run),
    }
    torch.save(state, temporary)
    os.replace(temporary, path)


def _resume(
    path: Path,
    adapter: nn.Module,
    optimizer: torch.optim.Optimizer,
    run: TrainingRun,
    identity: dict,
) -> int:
    try:
        state = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise QuicksilverError(f"cannot resume from {path}: {err}") from None
    theirs = state.get("identity", {})
    changed = sorted(k for k in identity.keys() | theirs.keys() if identity.get(k) != theirs.get(k))
    steps_only = changed == ["steps"]  # more (or fewer) steps of the same run may resume
    if changed and not steps_only:
        raise QuicksilverError(
            f"checkpoint {path} was made with other settings ({', '.join(changed)}); "
            "delete it or run with the same settings"
        )
    if state["step"] > identity["steps"]:
        raise QuicksilverError(
            f"checkpoint {path} is at step {state['step']}, past the {identity['steps']} asked"
        )
    adapter.load_state_dict(state["adapter"])
    optimizer.load_state_dict(state["optimizer"])
    run.losses[:] = state["run"]["losses"]
    run.tokens, run.seconds = state["run"]["tokens"], state["run"]["seconds"]
    return int(state["step"])
