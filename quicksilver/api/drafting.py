"""The drafting plan of a loaded model, measured once and kept on disk.

``runtime.draft_plan`` measures what drafting costs and earns on this machine (the verify
cost curve, each self-draft's cost and agreement); a model drafter or ``auto`` needs it before
its first step. Measuring takes tens of seconds (minutes where bf16 products are emulated), so
the result is cached under ``<cache root>/drafting/`` (``QUICKSILVER_CACHE`` moves the root,
beside the converted models), keyed by the model file, dtype, weight format, policy, torch
version and CPU: change any of them and it is measured again. An unreadable or outdated file
is measured again and replaced, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quicksilver.accounting import cpu_name
from quicksilver.errors import QuicksilverError
from quicksilver.models.convert_cache import cache_root
from quicksilver.outputs import write_json_atomic
from quicksilver.runtime.draft_plan import PLAN_VERSION, DraftPlan, calibrate

if TYPE_CHECKING:
    from quicksilver.api.llm import LLM
    from quicksilver.runtime.engine import Engine, PlanSource

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


def plan_key(llm: LLM, engine: Engine) -> dict[str, Any]:
    return {
        "model": model_identity(llm.source.kind, llm.source.path),
        "dtype": llm.dtype,
        "weights": repr(llm.weights),
        "policy": engine.plan_key(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "version": PLAN_VERSION,
    }


def plan_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root(None) / "drafting" / f"{digest}.json"


def _stderr(message: str) -> None:
    if sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)


def plan_source(llm: LLM) -> PlanSource:
    """What the engine calls for a plan it lacks: the cached one, else measured (on
    ``CALIBRATION_TEXT``; on the asking row's prompt for a model without a tokenizer) and
    saved. Without a ``progress`` callback, stages go to a terminal's stderr."""

    def source(
        engine: Engine, fallback_prompt: Sequence[int], progress: Callable[[str], None] | None
    ) -> DraftPlan:
        key = plan_key(llm, engine)
        path = plan_path(key)
        try:
            stored = json.loads(path.read_text())
            if stored.get("key") == key:
                return DraftPlan.from_dict(stored["plan"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError, QuicksilverError):
            pass  # missing, damaged or outdated: measured again below
        say = progress or _stderr
        say(f"measuring the drafting plan once for this model and machine (kept in {path})")
        text = fallback_prompt if llm.tokenizer is None else llm.encode(CALIBRATION_TEXT)
        plan = calibrate(engine, text, progress=say)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {"key": key, "plan": plan.to_dict()})
        except (OSError, QuicksilverError) as err:  # read-only: kept for this process only
            say(f"could not keep the drafting plan in {path}: {err}")
        return plan

    return source
