"""SkipDecode as published: low-rank adapters trained with the skip schedule active.

The paper's models were fine-tuned under their schedule; frozen, SmolLM2-135M at a 2x
schedule produces noise. Here the model learns to run under the very schedule
``generate --target-speedup X --max-new-tokens N`` builds (``schedule_for_speedup``), by
self-distillation: the loss is KL(dense frozen model || adapted model under the schedule) at
every position, so no labels are needed and the target is the model the user already trusts
(``loss="ce"``: next-token cross-entropy on the text instead).

Each training window of S tokens is a prompt of S - (N - 1) tokens followed by the N - 1
positions that decoding N new tokens feeds back (``forward.training_logits``). The loss
covers the prompt positions too: the merged adapter changes them as well, and their K/V are
what every generated position reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from quicksilver.adapt.forward import inference_logits, training_logits
from quicksilver.adapt.lora import LoRA
from quicksilver.adapt.train import TrainingSettings, train
from quicksilver.adapt.workspace import AdapterResult, Workspace, open_workspace, write_result
from quicksilver.errors import QuicksilverError
from quicksilver.policies import Policy, load_policy
from quicksilver.policies.skipdecode import schedule_for_speedup
from quicksilver.runtime.engine import Engine

LOSSES = ("kl", "ce")


def skipdecode_policy(workspace: Workspace, target_speedup: float, new_tokens: int) -> Policy:
    """The schedule ``generate --target-speedup`` uses for ``new_tokens`` new tokens."""
    schedule = schedule_for_speedup(workspace.model.config, target_speedup, new_tokens)
    return load_policy(None).replacing(schedule)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), both given as logits [..., V]."""
    log_student = F.log_softmax(student.float(), dim=-1).flatten(0, -2)
    log_teacher = F.log_softmax(teacher.float(), dim=-1).flatten(0, -2)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's logits against the token after it."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def adapt_skipdecode(
    model: str | os.PathLike[str],
    target_speedup: float = 2.0,
    new_tokens: int = 64,
    settings: TrainingSettings | None = None,
    rank: int = 8,
    loss: str = "kl",
    data: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> AdapterResult:
    """Train LoRA adapters of ``rank`` for ``model`` under the SkipDecode schedule of
    ``target_speedup`` over ``new_tokens`` new tokens; write the adapter file."""
    settings = settings or TrainingSettings()
    settings.check()
    if loss not in LOSSES:
        raise QuicksilverError(f"unknown loss {loss!r}; choose {' or '.join(LOSSES)}")
    if not 2 <= new_tokens <= settings.seq_len:
        raise QuicksilverError(
            f"new_tokens must be 2..seq_len ({settings.seq_len}) so that each window holds a "
            f"prompt and the {new_tokens - 1} generated positions, got {new_tokens}"
        )
    workspace = open_workspace(model, data, settings.seq_len)
    policy = skipdecode_policy(workspace, target_speedup, new_tokens)
    prompt_tokens = settings.seq_len - (new_tokens - 1)
    torch.manual_seed(settings.seed)
    lora = LoRA(workspace.model, rank)
    scheduled, dense = Engine(workspace.model, policy=policy), Engine(workspace.model)

    def step_loss(step: int, batch: torch.Tensor) -> float:
        handles = lora.attach(workspace.model)
        try:
            student = training_logits(scheduled, batch, prompt_tokens)
        finally:
            for handle in handles:
                handle.remove()
        if loss == "ce":
            value = next_token_loss(student, batch)
        else:
            value = distillation_loss(student, inference_logits(dense, batch).clone())
        value.backward()
        return float(value.detach())

    evaluate = _validation(workspace, scheduled, dense, lora, prompt_tokens, settings.batch_size)
    before = evaluate(adapted=False)
    schedule = policy.to_config()
    identity = {"kind": "skipdecode", "base": workspace.base_sha256, "rank": rank, "loss": loss}
    identity.update(schedule=schedule, data=workspace.data)
    path = None if checkpoint is None else Path(checkpoint)
    run = train(lora, step_loss, workspace.windows, settings, identity, path, progress)
    details = {
        "rank": rank,
        "alpha": lora.alpha,
        "loss": loss,
        "target_speedup": target_speedup,
        "new_tokens": new_tokens,
        "prompt_tokens": prompt_tokens,
        "schedule": schedule,
        "validation": {"frozen": before, "adapted": evaluate(adapted=True)},
    }
    tensors = {}
    for name, update in lora.named_updates():
        tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = update.a, update.b
    return write_result(workspace, "skipdecode", tensors, details, settings, run, output)


def _validation(
    workspace: Workspace,
    scheduled: Engine,
    dense: Engine,
    lora: LoRA,
    prompt_tokens: int,
    batch_size: int,
):
    """``evaluate(adapted) -> dict``: on the held-out windows' generated positions, the
    next-token loss of the dense model, of the model under the schedule, and the KL between
    them (the adapter attached or not)."""

    def evaluate(adapted: bool) -> dict:
        totals = {"dense_nll": 0.0, "scheduled_nll": 0.0, "kl": 0.0}
        batches = workspace.validation_batches(batch_size)
        for batch in batches:
            teacher = inference_logits(dense, batch)[:, prompt_tokens:]
            handles = lora.attach(workspace.model) if adapted else []
            student = inference_logits(scheduled, batch, prompt_tokens)[:, prompt_tokens:]
            for handle in handles:
                handle.remove()
            generated = batch[:, prompt_tokens:]
            totals["dense_nll"] += float(next_token_loss(teacher, generated))
            totals["scheduled_nll"] += float(next_token_loss(student, generated))
            totals["kl"] += float(distillation_loss(student, teacher))
        return {key: round(value / len(batches), 5) for key, value in totals.items()}

    return evaluate
