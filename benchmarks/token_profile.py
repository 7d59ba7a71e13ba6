"""Where a generated token's time goes, end to end: weight products, attention, the other ops
of a forward, and the Python between forwards (sampling, drafting, acceptance, text).

Runs ``LLM.generate`` (the path users call) at batch 1, greedy, plain and with a drafter,
under ``torch.profiler``; every aten op is put in one bucket by name, and the time outside
``Engine.forward`` (measured with a wrapper, profiler off) is what the step loop, the API and
detokenising cost. Writes ``docs/results/token-breakdown.md`` with the command.

    .venv/bin/python benchmarks/token_profile.py --weights int4
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import quicksilver as qs
from quicksilver import kernels
from quicksilver.accounting import cpu_name

ROOT = Path(__file__).resolve().parent.parent
PROMPT = (
    "Summarise the following note in one sentence. Note: the library on the corner of the "
    "square opened in the spring; on its first morning a queue of children waited at the door, "
    "each holding a card with their name on it. Summary:"
)
# Op names by bucket; the first bucket whose pattern is in an op's name takes it.
BUCKETS = [
    (
        "weight products",
        (
            "int4pack_mm",
            "int8pack_mm",
            "mkldnn_linear",
            "linear_pointwise",
            "addmm",
            "aten::mm",
            "int_linear",  # our kernels (QUICKSILVER_KERNELS=ours)
        ),
    ),
    (
        "attention",
        ("bmm", "matmul", "softmax", "masked_fill", "baddbmm", "scaled_dot", "attend_each"),
    ),
    # The compiled graph's own fused kernels (norms, RoPE, cache writes, activations) run
    # inside its call; the calls into dynamo and the graph's wrappers are overhead.
    ("compiled graph's fused ops", ("CompiledFxGraph", "cpp_fused", "Torch-Compiled Region")),
    ("dynamo (guards, wrappers)", ("TorchDynamo", "Pregraph bytecode", "AOTDispatcher")),
    ("norms and activations", ("rsqrt", "pow", "mean", "silu", "mul", "add", "neg")),
    (
        "copies, casts, indexing",
        (
            "copy_",
            "to",
            "index",
            "cat",
            "slice",
            "view",
            "reshape",
            "transpose",
            "contiguous",
            "expand",
            "select",
            "clone",
            "empty",
            "zeros",
            "fill",
            "stack",
            "arange",
            "unsqueeze",
            "permute",
            "gather",
            "scatter",
            "where",
            "item",
            "_local_scalar_dense",
        ),
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--weights", default=None, help="int8 or int4 (default: dtype's)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--speculative", default="ngram", help="the drafted run's method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="the compiled decode step")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "results" / "token-breakdown.md"
    )
    return parser


def bucket(name: str) -> str:
    for label, patterns in BUCKETS:
        if any(p in name for p in patterns):
            return label
    return "other ops"


def timed_forwards(llm: qs.LLM) -> list[float]:
    """Wrap the engine's forward so every call's wall time is kept (profiler off)."""
    spent: list[float] = []
    forward = llm.engine.forward

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    llm.engine.forward = timed
    return spent


def one_run(llm: qs.LLM, tokens: int, speculative: str | None) -> dict[str, float]:
    """Milliseconds per generated token, by bucket (best of three runs for the totals)."""
    options = dict(max_new_tokens=tokens, ignore_eos=True, speculative=speculative)
    llm.generate(PROMPT, **options)  # warm-up (and the plan, for a model drafter)
    best: dict[str, float] | None = None
    for _ in range(3):
        spent = timed_forwards(llm)
        start = time.perf_counter()
        out = llm.generate(PROMPT, **options)
        total = time.perf_counter() - start
        del llm.engine.forward  # the instance attribute goes; the method is back
        made = len(out.completions[0].token_ids)
        row = {"total": total / made, "forwards": sum(spent) / made, "calls": len(spent) / made}
        if best is None or row["total"] < best["total"]:
            best = row
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = llm.generate(PROMPT, **options)
    made = len(out.completions[0].token_ids)
    by_bucket: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        by_bucket[bucket(event.key)] += event.self_cpu_time_total / 1e3 / made  # us -> ms
    profiled = sum(by_bucket.values())
    # The profiler slows ops down; its split is applied to the unprofiled forward time.
    for label, ms in by_bucket.items():
        best[label] = best["forwards"] * 1e3 * ms / profiled if profiled else 0.0
    best["total"] *= 1e3
    best["between forwards"] = best["total"] - best["forwards"] * 1e3
    best["forwards"] *= 1e3
    return best


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    kwargs = {"compile": args.compile}
    if args.weights is not None:
        kwargs["weights"] = args.weights
    llm = qs.load(args.model, dtype=args.dtype, **kwargs)
    runs = {"plain": one_run(llm, args.tokens, None)}
    runs[args.speculative] = one_run(llm, args.tokens, args.speculative)
    labels = [label for label, _ in BUCKETS] + ["other ops", "between forwards"]
    command = kernels.command_prefix() + shlex.join(
        ["python", "benchmarks/token_profile.py", *(argv or sys.argv[1:])]
    )
    lines = [
        f"# Where a token's time goes: {args.model}, {args.dtype}"
        + (f", {args.weights} weights" if args.weights else "")
        + (", compiled step" if args.compile else ""),
        "",
        f"{cpu_name()}, {platform.machine()}, {args.threads} threads, torch {torch.__version__}"
        f"{', our int8/int4 kernels' if kernels.wanted() else ''}; "
        f"batch 1, greedy, {args.tokens} new tokens, `LLM.generate`. Milliseconds per "
        "generated token (best of 3); the op split is the profiler's, applied to the "
        "unprofiled forward time.",
        "",
        f"```bash\n{command}\n```",
        "",
        "| run | ms/token | forwards/token | " + " | ".join(labels) + " |",
        "|---|---|---|" + "---|" * len(labels),
    ]
    for name, row in runs.items():
        cells = " | ".join(f"{row.get(label, 0.0):.2f}" for label in labels)
        lines.append(f"| {name} | {row['total']:.2f} | {row['calls']:.2f} | {cells} |")
        print(name, {k: round(v, 2) for k, v in row.items()}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
