"""Verified decoding against plain decoding, in one process: ``quicksilver bench
--speculative`` and ``benchmarks/speculative.py`` both measure through here.

For each prompt set, batch size and drafting method: end-to-end tokens/s (prompt and
decoding, the drafting plan's measurement excluded and reported apart), its ratio to plain
decoding's on the same prompts, decode forwards, mean accepted length (vLLM's definition),
draft and verify FLOPs, and how many rows equal plain greedy decoding's tokens exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from quicksilver.api.llm import LLM
from quicksilver.bench.throughput import bench_prompts

# Grounded prompts ask the model to work from a document; open ones continue it.
TASKS = {
    "summarise": "{doc}\n\nSummarise the text above in a few sentences.\nSummary:",
    "copy": "{doc}\n\nCopy the first three sentences of the text above exactly.\n",
    "answer": "{doc}\n\nAnswer from the text above: what is it about, and who is it for?\n",
    "continue": "{doc}",
}
GROUNDED = ("summarise", "copy", "answer")


def task_prompts(llm: LLM, documents: Sequence[str]) -> dict[str, list[list[int]]]:
    """Every task's prompt for every document, as token ids."""
    return {
        task: [llm.encode(template.format(doc=doc)) for doc in documents]
        for task, template in TASKS.items()
    }


def default_documents(llm: LLM, count: int, tokens: int) -> tuple[list[str], str]:
    """``count`` documents of ``tokens`` tokens (WikiText-2 validation slices, or the
    built-in paragraph where that text is missing) and where they came from."""
    ids, origin = bench_prompts(llm.tokenizer, count, tokens)
    return [llm.decode(slice_) for slice_ in ids], origin


def run_generation(
    llm: LLM, prompts: list[list[int]], batch: int, new_tokens: int, speculative: Any, policy: Any
) -> dict[str, Any]:
    """All prompts, ``batch`` at a time: tokens, seconds and what drafting did. A row ends at
    EOS (or after ``new_tokens``), the same way with and without drafting."""
    tokens, seconds, forwards = [], 0.0, 0
    drafts = accepted = draft_flops = verify_flops = 0
    calibration = 0.0
    for start in range(0, len(prompts), batch):
        rows = prompts[start : start + batch]
        begin = time.perf_counter()
        out = llm.generate(rows, max_new_tokens=new_tokens, speculative=speculative, policy=policy)
        record = out.speculative or {}
        calibration += record.get("calibration_seconds", 0.0)
        seconds += time.perf_counter() - begin
        tokens += [c.token_ids for c in out.completions]
        forwards += out.decode_steps
        drafts += record.get("drafts", 0)
        accepted += record.get("accepted_tokens", 0)
        draft_flops += record.get("draft_flops", 0)
        verify_flops += record.get("verify_flops", 0)
    return {
        "tokens": tokens,
        "seconds": seconds - calibration,
        "forwards": forwards,
        "mean_accepted_length": 1 + accepted / max(1, drafts),
        "draft_flops": draft_flops,
        "verify_flops": verify_flops,
    }


def measure(
    llm: LLM,
    prompts_by_task: dict[str, list[list[int]]],
    methods: Sequence[str],
    batch_sizes: Sequence[int],
    new_tokens: int,
    num_tokens: int | None = None,
    policy: Any = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The report: one row per (task, batch size, method), and the drafting plan used."""
    say = progress or (lambda message: None)
    needs_plan = any(m != "ngram" for m in methods)
    plan = llm.draft_plan(policy=policy, progress=say) if needs_plan else None
    warm = next(iter(prompts_by_task.values()))[0]
    # First calls pay one-time costs (allocator, kernels, compiled graphs, which differ for
    # one row and for several), so each batch size is warmed before anything is timed.
    for batch in sorted(set(batch_sizes)):
        for method in (None, *methods):
            llm.generate([warm] * batch, max_new_tokens=8, speculative=method, policy=policy)
    rows = []
    for task, prompts in prompts_by_task.items():
        for batch in batch_sizes:
            plain = run_generation(llm, prompts, batch, new_tokens, None, policy)
            total = sum(map(len, plain["tokens"]))
            for method in methods:
                setting = {"method": method}
                if num_tokens is not None:
                    setting["num_tokens"] = num_tokens
                fast = run_generation(llm, prompts, batch, new_tokens, setting, policy)
                same = sum(a == b for a, b in zip(plain["tokens"], fast["tokens"], strict=True))
                rows.append(
                    {
                        "task": task,
                        "batch": batch,
                        "method": method,
                        "plain_tok_s": total / plain["seconds"],
                        "tok_s": sum(map(len, fast["tokens"])) / fast["seconds"],
                        "speedup": plain["seconds"] / fast["seconds"],
                        "forwards": f"{plain['forwards']} / {fast['forwards']}",
                        "mean_accepted_length": fast["mean_accepted_length"],
                        "draft_gflop": fast["draft_flops"] / 1e9,
                        "verify_gflop": fast["verify_flops"] / 1e9,
                        "identical": f"{same}/{len(prompts)}",
                        "plain_tokens": plain["tokens"],
                        "fast_tokens": fast["tokens"],
                    }
                )
                say(
                    f"{task} batch {batch} {method}: {rows[-1]['speedup']:.2f}x plain, "
                    f"{rows[-1]['identical']} identical"
                )
    return {"rows": rows, "plan": None if plan is None else plan.to_dict()}


TABLE_COLUMNS = (
    "task",
    "batch",
    "method",
    "plain_tok_s",
    "tok_s",
    "speedup",
    "forwards",
    "mean_accepted_length",
    "draft_gflop",
    "verify_gflop",
    "identical",
)


def table_rows(report: dict[str, Any]) -> list[list[Any]]:
    return [[row[c] for c in TABLE_COLUMNS] for row in report["rows"]]


def plan_lines(plan: dict[str, Any] | None) -> list[str]:
    """The drafting plan in a few lines (what the model drafters and auto followed)."""
    if plan is None:
        return []
    lines = []
    for rows, curve in zip(plan["rows"], plan["verify_cost"], strict=True):
        costs = ", ".join(f"{c:.2f}" for c in curve)
        lines.append(f"verify cost at batch {rows}, k = 0..{len(curve) - 1}: {costs} steps")
    exit_layer = plan.get("exit_layer")
    how = "" if exit_layer is None else f" (an early exit through layer {exit_layer}'s head)"
    lines.append(
        f"layers: skips {plan['skipped_layers']}{how}, agreement "
        f"{plan['layers_agreement']:.2f}, draft step {plan['layers_cost'][0]:.2f} of a full "
        "step at batch 1"
    )
    if plan["planes_agreement"] is not None:
        lines.append(
            f"planes: agreement {plan['planes_agreement']:.2f}, draft step "
            f"{plan['planes_cost'][0]:.2f} of a full step at batch 1"
        )
    lines.append(f"measured in {plan['seconds']:.1f} s (once; cached on disk)")
    return lines
