"""SkipDecode frozen vs adapted: LoRA trained under the schedule, then measured.

Trains a LoRA adapter with `quicksilver.adapt.adapt_skipdecode` (self-distillation on the C4
validation sample, its held-out slice kept apart) for --steps steps, then reports on the
held-out windows' generated positions the teacher-forced next-token loss (as perplexity) of
the dense model, of the frozen model under the schedule and of the adapted one, and greedy
decode speed (tokens/s, counted GFLOP/token) dense, frozen-under-schedule and adapted (the
adapter merged at load, so adapted and frozen decode the same work). Writes
docs/results/adapters.md with the command that made it.

    .venv/bin/python benchmarks/adapters.py --steps 300 --threads 2
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import torch

import quicksilver as qs
from quicksilver import adapt
from quicksilver.policies.skipdecode import schedule_for_speedup

PROMPT = "The history of the city begins in the early nineteenth century, when"


def decode_row(llm: qs.LLM, policy: qs.Policy | None, new_tokens: int) -> tuple[float, float]:
    out = llm.generate(PROMPT, max_new_tokens=new_tokens, policy=policy)
    return out.decode_tokens_per_s, out.flops_per_token / 1e9


def build_parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (the docs' commands are checked
    against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=qs.DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--target-speedup", type=float, default=2.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="docs/results/adapters.md")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    settings = adapt.TrainingSettings(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len
    )
    result = adapt.adapt_skipdecode(args.model, args.target_speedup, args.max_new_tokens, settings)
    record = result.record
    frozen, adapted = record["validation"]["frozen"], record["validation"]["adapted"]
    dense_llm = qs.load(args.model)
    adapted_llm = qs.load(args.model, adapter=result.path)
    schedule = schedule_for_speedup(dense_llm.config, args.target_speedup, args.max_new_tokens)
    policy = qs.load_policy(None).replacing(schedule)
    rows = [
        ("dense", math.exp(frozen["dense_nll"]), *decode_row(dense_llm, None, args.max_new_tokens)),
        ("schedule, frozen", math.exp(frozen["scheduled_nll"]),
         *decode_row(dense_llm, policy, args.max_new_tokens)),
        ("schedule, adapted", math.exp(adapted["scheduled_nll"]),
         *decode_row(adapted_llm, policy, args.max_new_tokens)),
    ]  # fmt: skip
    lines = [
        f"# SkipDecode with trained LoRA ({args.model}, target {args.target_speedup}x)",
        "",
        f"Command: `{shlex.join([sys.executable, *sys.argv])}`",
        "",
        f"Schedule: {schedule}. Training: {record['steps']} steps, {record['tokens']} tokens, "
        f"{record['seconds']:.0f} s, rank {record['rank']}, KL to the dense model. Held-out: "
        "the C4 sample's last documents, generated positions only.",
        "",
        "| model | held-out perplexity | decode tok/s | GFLOP/token |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {ppl:.2f} | {tps:.1f} | {gflop:.3f} |" for name, ppl, tps, gflop in rows),
        "",
        f"Adapter file: `{result.path}`",
    ]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
