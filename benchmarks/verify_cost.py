"""What a verify forward costs on this machine: k new tokens of one row over a filled cache.

Verified decoding pays off when checking k drafted tokens costs about one decode step; that
depends on the CPU and the weight format (a multi-row product may take another kernel than a
one-row one). For each format: ``Engine.forward`` of k = 1..16 tokens after a 300-token prompt
and a few decode steps, logits at every position, best of ``--repeats``, in milliseconds and
relative to k = 1.

    .venv/bin/python benchmarks/verify_cost.py            # writes docs/results/verify-cost.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

import quicksilver as qs
from quicksilver import kernels

ROOT = Path(__file__).resolve().parent.parent
# (activations, weights, int4 kernel): ours rounds activations to int8 (quicksilver.kernels),
# torch's is the one int4 ran before it; both in one run, so the ratio between them holds.
# The last field: the compiled graph (``qs.load(compile=True)``: decode steps and verify
# forwards of up to 32 tokens a row) instead of the eager forward.
FORMATS = [
    ("float32", None, None, False),
    ("bfloat16", None, None, False),
    ("bfloat16", "int4", "torch", False),
    ("bfloat16", "int4", "ours", False),
    ("float32", "int4", "ours", False),
    ("bfloat16", "int4", "torch", True),
    ("bfloat16", "int4", "ours", True),
    ("float32", "int4", "ours", True),
]
SIZES = [1, 2, 4, 8, 16]


# Decode steps between the prompt and the timed forward: in decoding every forward follows
# another, and the first forward after a prompt's prefill costs ~1 ms more (measured).
STEPS_BEFORE = 4


def cost_ms(llm: qs.LLM, k: int, context: int, repeats: int) -> float:
    engine = llm.engine
    prompt = torch.randint(100, 20000, (1, context), generator=torch.Generator().manual_seed(0))
    step = torch.randint(100, 20000, (1, 1), generator=torch.Generator().manual_seed(2))
    fed = torch.randint(100, 20000, (1, k), generator=torch.Generator().manual_seed(1))
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        cache = engine.new_cache(1, context + STEPS_BEFORE + k)
        engine.forward(prompt, cache)
        for _ in range(STEPS_BEFORE):
            engine.forward(step, cache)
        start = time.perf_counter()
        engine.forward(fed, cache, logits_at="all")
        best = min(best, time.perf_counter() - start)
    return best * 1000


def build_parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (the docs' commands are checked
    against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=2, help="CPU threads (default: 2, as its page was measured)"
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="eager forwards only (no compiled rows)"
    )
    parser.add_argument("--markdown", default=str(ROOT / "docs" / "results" / "verify-cost.md"))
    return parser


def main() -> int:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for dtype, weights, kernel, compiled in FORMATS:
        if compiled and args.no_compile:
            continue
        if kernel is not None and kernel == "ours" and not kernels.available():
            print(f"skipped {dtype} {weights} ours: {kernels.unavailable_reason()}")
            continue
        os.environ["QUICKSILVER_KERNELS"] = kernel or "ours"
        llm = qs.load(args.model, dtype=dtype, weights=weights, compile=compiled)
        costs = [cost_ms(llm, k, args.context, args.repeats) for k in SIZES]
        kernel_name = {"ours": "our kernels", "torch": "torch's kernels"}.get(kernel or "")
        name = f"{dtype}" + (f", {weights} weights ({kernel_name})" if weights else "")
        name += ", compiled" if compiled else ""
        cells = " | ".join(f"{c:.1f} ({c / costs[0]:.2f})" for c in costs)
        rows.append(f"| {name} | {cells} |")
        print(rows[-1], flush=True)
    header = "| format | " + " | ".join(f"k = {k}" for k in SIZES) + " |"
    table = "\n".join([header, "|---|" + "---|" * len(SIZES), *rows])
    cpu = platform.processor() or platform.machine()
    text = f"""# The cost of a verify forward ({args.model}, {args.threads} threads, {cpu})

```bash
.venv/bin/python benchmarks/verify_cost.py {" ".join(sys.argv[1:])}
```

`Engine.forward` of k new tokens of one row after a {args.context}-token prompt and
{STEPS_BEFORE} decode steps (as in decoding, where each forward follows another), logits at
every position, best of {args.repeats} after a warm-up (which pays any compilation):
milliseconds, and in brackets relative to k = 1 (a decode step of the same row). Verified
decoding with drafts of k - 1 tokens gains where this ratio stays near 1.

{table}
"""
    Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
