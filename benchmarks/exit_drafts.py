"""The `layers` self-draft with and without exit heads: the drafting plan's candidates
(agreement with the model's own greedy text, draft step cost, expected speed-up) and what
greedy decoding at batch 1 does with `layers` and `auto`.

A model loaded with an exit-heads adapter (`quicksilver adapt exits`) also measures early
exits (the top layers left out, the last state read through its layer's head) beside the
layer-skipping sets; the plan keeps whichever is expected to be fastest. Replaces (or
appends) this benchmark's section of docs/results/adapters.md.

    .venv/bin/python benchmarks/exit_drafts.py --adapter ADAPTER.safetensors --threads 2
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from halting_exits import write_section

import quicksilver as qs

HEADING = "## The `layers` self-draft through an exit head"
PROMPTS = (
    "The history of the city begins in the early nineteenth century, when",
    "In mathematics, a prime number is a natural number greater than one that",
)


def build_parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (the docs' commands are checked
    against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=qs.DEFAULT_MODEL)
    parser.add_argument("--adapter", required=True, help="exit heads (`quicksilver adapt exits`)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="docs/results/adapters.md")
    return parser


def candidate_lines(name: str, plan) -> list[str]:
    chosen = (plan.skipped_layers, plan.exit_layer)
    lines = []
    for c in plan.candidates:
        kind = "skip set" if "exit_layer" not in c else f"exit after layer {c['exit_layer']}"
        mark = " (chosen)" if (c["skipped"], c.get("exit_layer")) == chosen else ""
        lines.append(
            f"| {name} | {kind}{mark} | {len(c['skipped'])} | {c['agreement']:.3f} "
            f"| {c['cost'][0]:.2f} | {c['num_tokens']} | {c['expected_speedup']:.2f}x |"
        )
    return lines


def decode(llm: qs.LLM, method: str | None, new_tokens: int) -> tuple[float, str, list]:
    """Decode tokens/s over the prompts, the methods auto used, and the texts."""
    seconds = tokens = 0.0
    used: dict[str, list[int]] = {}
    texts = []
    for prompt in PROMPTS:
        out = llm.generate(prompt, max_new_tokens=new_tokens, speculative=method)
        seconds += out.new_tokens / out.decode_tokens_per_s
        tokens += out.new_tokens
        texts.append(out.completions[0].token_ids)
        for m, counts in ((out.speculative or {}).get("by_method") or {}).items():
            total = used.setdefault(m, [0, 0])
            total[0] += counts["draft_tokens"]
            total[1] += counts["accepted_tokens"]
    shown = ", ".join(f"{m}: {a}/{d} accepted" for m, (d, a) in used.items()) or "-"
    return tokens / seconds, shown, texts


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    models = {
        "frozen": qs.load(args.model),
        "exit heads": qs.load(args.model, adapter=args.adapter),
    }
    plans = {name: llm.draft_plan() for name, llm in models.items()}
    lines = [
        HEADING,
        "",
        f"Command: `.venv/bin/python {shlex.join(sys.argv)}`",
        "",
        "Candidates of the `layers` draft (agreement: the draft's argmax against the model's "
        "own greedy continuation of the calibration text; cost: a draft step over a full "
        "step at batch 1; k and speed-up: the plan's best draft length and expected "
        "speed-up):",
        "",
        "| model | draft | layers left out | agreement | cost | k | expected |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, plan in plans.items():
        lines += candidate_lines(name, plan)
    lines += [
        "",
        f"Greedy decoding at batch 1, {len(PROMPTS)} prompts x {args.max_new_tokens} tokens "
        "(the last column: positions where the output equals plain decoding's, the same model "
        "without drafts):",
        "",
        "| model | speculative | decode tok/s | drafts accepted | tokens as plain decoding's |",
        "| --- | --- | ---: | --- | ---: |",
    ]
    for name, llm in models.items():
        plain = None
        for method in (None, "layers", "auto"):
            speed, used, texts = decode(llm, method, args.max_new_tokens)
            plain = plain or texts
            rows = zip(texts, plain, strict=True)
            pairs = [(a, b) for mine, ref in rows for a, b in zip(mine, ref, strict=False)]
            same = sum(a == b for a, b in pairs)
            lines.append(
                f"| {name} | {method or 'off'} | {speed:.1f} | {used} | {same}/{len(pairs)} |"
            )
    write_section(Path(args.output), lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
