"""The drafting plans of a loaded model, measured once and kept on disk.

``speculative.cost_plan`` measures what drafting costs and earns on this machine (the verify
cost curve, each self-draft's cost and agreement); a model drafter or ``auto`` follows it.
Measuring takes tens of seconds (minutes where bf16 products are emulated), so the ``LLM``'s
``DraftPlans`` keeps each plan in ``PlanFiles`` under ``<cache root>/drafting/``
(``QUICKSILVER_CACHE`` moves the root, beside the converted models), keyed by the model file,
dtype, weight format, policy, torch version, threads and CPU: change any of them and it is
measured again. An unreadable or outdated file is measured again and replaced, never trusted;
the least recently used files beyond ``MAX_PLAN_FILES`` are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quicksilver.accounting import cpu_name
from quicksilver.errors import QuicksilverError
from quicksilver.models.convert_cache import cache_root
from quicksilver.outputs import write_json_atomic
from quicksilver.runtime.speculative.cost_plan import PLAN_VERSION, DraftPlan
from quicksilver.runtime.speculative.plans import DraftPlans

if TYPE_CHECKING:
    from quicksilver.api.llm import LLM

MAX_PLAN_FILES = 16  # plans kept on disk: one per model, format, policy and machine in use

# The model continues this text greedily; drafts are judged on that continuation. Plain,
# general prose, so the plan does not lean towards one kind of prompt.
CALIBRATION_TEXT = (
    "The library on the corner of the square opened in the spring. On its first morning a "
    "queue of children waited at the door, each holding a card with their name on it. The "
    "librarian, who had worked in the old building for twenty years, showed them where the "
    "picture books were kept, how to find a story by its author, and why a returned book goes "
    "back on the trolley before it goes back on the shelf. By the afternoon the reading room "
    "was full, and the town council decided to keep the doors open until eight in the evening."
)


def model_identity(kind: str, location: str) -> str:
    """The model's files as they are now (path, size and modification time of each): a
    replaced file gets a new plan; a hub id stands for itself."""
    path = Path(location)
    try:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        parts = [f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in files]
    except OSError:
        parts = []
    return f"{kind}:" + ";".join(parts or [location])


def plan_key(llm: LLM, policy_key: str) -> dict[str, Any]:
    """Everything that changes a plan: the model's files, adapter and format, the kernels its
    products run and whether its forwards are compiled (both change what a forward of k
    tokens costs), the policy (the registry's own key), the torch build, the threads and the
    CPU. (A model loaded without an adapter, on torch's kernels, eager, keeps the key it
    always had.)"""
    key = {
        "model": model_identity(llm.source.kind, llm.source.path),
        "dtype": llm.dtype,
        "weights": repr(llm.weights),
        "policy": policy_key,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "version": PLAN_VERSION,
    }
    adapter = getattr(llm, "adapter", None)  # stand-ins for an LLM may not have one
    if adapter is not None:
        key["adapter"] = model_identity("adapter", adapter)
    engine = getattr(llm, "engine", None)
    if engine is not None and engine.exact_attention:
        key["kernels"] = "ours"
    if engine is not None and engine.compiled is not None:
        key["compiled"] = True
    return key


def plan_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root(None) / "drafting" / f"{digest}.json"


def _note(message: str) -> None:
    """One line on stderr, terminal or not."""
    print(f"quicksilver: {message}", file=sys.stderr, flush=True)


def calibration_tokens(llm: LLM) -> list[int] | None:
    """What a measurement continues: ``CALIBRATION_TEXT``, or None for a model without a
    tokenizer (then the asking row's prompt)."""
    return None if llm.tokenizer is None else llm.encode(CALIBRATION_TEXT)


def plans_for(llm: LLM) -> DraftPlans:
    """The registry an ``LLM`` owns: plans measured on ``CALIBRATION_TEXT``, kept on disk."""
    return DraftPlans(PlanFiles(llm), lambda: calibration_tokens(llm))


class PlanFiles:
    """The on-disk store behind an ``LLM``'s ``DraftPlans``: one JSON file per full key,
    at most ``MAX_PLAN_FILES`` of them, the least recently used removed first (a read
    touches its file)."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm

    def location(self, key: str) -> str:
        return str(plan_path(plan_key(self.llm, key)))

    def load(self, key: str) -> DraftPlan | None:
        full = plan_key(self.llm, key)
        path = plan_path(full)
        if not path.exists():
            return None
        try:
            stored = json.loads(path.read_text())
            if stored.get("key") == full:
                plan = DraftPlan.from_dict(stored["plan"])
                os.utime(path)  # recently used: the last to be evicted
                return plan
        except (OSError, ValueError, TypeError, KeyError, AttributeError, QuicksilverError):
            pass
        _note(f"the drafting plan in {path} is damaged or not this model's: measuring it again")
        return None

    def save(self, key: str, plan: DraftPlan) -> None:
        path = plan_path(plan_key(self.llm, key))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {"key": plan_key(self.llm, key), "plan": plan.to_dict()})
            evict_plans(path.parent, keep=MAX_PLAN_FILES)
        except (OSError, QuicksilverError) as err:  # read-only: kept for this process only
            _note(f"could not keep the drafting plan in {path}: {err}")


def evict_plans(directory: Path, keep: int) -> None:
    """Remove all but the ``keep`` most recently used plan files in ``directory``."""
    files = sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for stale in files[keep:]:
        stale.unlink(missing_ok=True)
