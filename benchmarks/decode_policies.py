"""Decoding under each policy vs dense, at several batch sizes, in one run.

For every policy and batch size, `evaluate_generation` runs dense and policy greedy decoding
back to back on the same prompts (first sentences of WikiText-2 test paragraphs), so the
tokens/s ratio is taken in one run; it also reports counted decode FLOPs per generated token,
agreement with dense output, ROUGE-L and the dense model's perplexity of the policy's
continuations. The halting threshold is calibrated first, by the search of `quicksilver
calibrate --measure generation --steps 5`, on WikiText-2 *validation* prompts. Peak RSS is the
process's during each row. Writes docs/results/decode.md, decode.json, decode.png.

    .venv/bin/python benchmarks/decode_policies.py
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import quicksilver as qs
from quicksilver.accounting import Meter
from quicksilver.eval.calibrate import calibrate, generation_measure
from quicksilver.eval.datasets import load_eval_text
from quicksilver.eval.generation import (
    evaluate_generation,
    wikitext_prompts,
)
from quicksilver.eval.report import format_table
from quicksilver.models.config import ModelConfig
from quicksilver.outputs import write_json_atomic
from quicksilver.policies import Policy
from quicksilver.policies.base import PolicyConfigError
from quicksilver.policies.skipdecode import schedule_for_speedup

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


def halting_base(depth: int) -> dict:
    """The halting signal we calibrate: logit-lens entropy over a 2,048-id shortlist (4% of
    a full head product), checked once at 80% of the depth (layer 24 of SmolLM2's 30), late
    enough for the lens to be mostly right."""
    layer = round(0.8 * depth)
    return {
        "halting": {"entropy_bits": 0.5, "lens_vocab": 2048, "min_layer": layer, "interval": 100}
    }


def policies(config: ModelConfig, new_tokens: int, halting: Policy) -> list[tuple[str, Policy]]:
    base = halting_base(config.n_layers)["halting"]
    rows = [("dense", Policy())]
    for target in (1.5, 2.0, 2.5, 3.0):
        try:
            schedule = schedule_for_speedup(config, target, new_tokens)
        except PolicyConfigError as err:  # a shallow model cannot reach every target
            print(f"skipping SkipDecode {target}x: {err}", file=sys.stderr, flush=True)
            continue
        rows.append((f"SkipDecode, {target}x decode-FLOP target", Policy([schedule])))
    rows += [
        ("halting, calibrated for <= 1% on validation", halting),
        (
            f"halting: every token exits after layer {base['min_layer']} (mechanics, no signal)",
            Policy.from_config(
                # the shortlist's entropy is at most log2(2048) = 11 bits: every token halts
                {"halting": {**base, "entropy_bits": 12.0}}
            ),
        ),
        (
            f"halting: relative drift < 0.15 from layer {round(0.27 * config.n_layers)} (skip)",
            Policy.from_config(
                {
                    "halting": {"relative_drift": 0.15, "min_layer": round(0.27 * config.n_layers)},
                    "kv_skip": {"treatment": "skip"},
                }
            ),
        ),
        (
            "Matryoshka int8 (int8 kernel in decode)",
            Policy.from_config({"matryoshka": {"fixed_bits": 8}}),
        ),
    ]
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (the docs' commands are checked
    against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=qs.DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--calibration-prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "results")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raw = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/decode_policies.py" + (" " + shlex.join(raw) if raw else "")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_average = os.getloadavg()[0]
    torch.set_num_threads(os.cpu_count() or 1)

    llm = qs.load(args.model, dtype=args.dtype)
    model = llm.model

    def encode(split: str, n: int) -> list[list[int]]:
        prompts = wikitext_prompts(load_eval_text("wikitext-2", split).text, n)
        return [llm.encode(p) for p in prompts]

    print("calibrating halting on validation prompts", file=sys.stderr, flush=True)
    calibration = calibrate(
        generation_measure(
            model, encode("validation", args.calibration_prompts), max_new_tokens=args.new_tokens
        ),
        Policy.from_config(halting_base(model.config.n_layers)),
        max_ppl_increase=0.01,
        steps=5,
    )
    halting = Policy.from_config(calibration.policy)
    ids = encode("test", args.prompts)
    chosen = policies(model.config, args.new_tokens, halting)
    rows: list[dict[str, Any]] = []
    for label, policy in chosen:
        for size in args.batch_sizes:
            print(f"{label}, batch {size}", file=sys.stderr, flush=True)
            with Meter() as meter:
                result = evaluate_generation(
                    model, policy, ids, max_new_tokens=args.new_tokens, batch_size=size
                )
            rows.append(
                {
                    "label": label,
                    "policy": policy.to_config(),
                    "peak_rss_mb": meter.peak_rss_bytes / MB,
                    **result.to_dict(),
                }
            )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        args.out_dir / "decode.json",
        {
            "command": command,
            "date": date,
            "load_average": load_average,
            "halting_calibration": calibration.to_dict(),
            "rows": rows,
        },
    )
    table = [
        [
            r["label"],
            r["batch_size"],
            f"{r['policy_tokens_per_s']:.1f}",
            f"{r['dense_tokens_per_s']:.1f}",
            f"{r['policy_tokens_per_s'] / r['dense_tokens_per_s']:.2f}x",
            f"{r['policy_flops_per_token'] / r['dense_flops_per_token']:.3f}",
            f"{r['policy_prefill_flops_per_token'] / r['dense_prefill_flops_per_token']:.3f}",
            f"{r['agreement']:.3f}",
            f"{r['rouge_l']:.3f}",
            f"{r['dense_ppl_of_policy']:.3f}",
            f"{r['dense_ppl_of_dense']:.3f}",
            f"{r['dense_ppl_of_policy'] / r['dense_ppl_of_dense'] - 1:+.1%}",
            f"{r['peak_rss_mb']:.0f}",
        ]
        for r in rows
    ]
    headers = ["policy", "batch", "tok/s", "dense tok/s", "speedup", "decode FLOPs/dense"]
    headers += ["prompt FLOPs/dense"]
    headers += ["agreement", "ROUGE-L", "dense ppl of text", "dense ppl (dense)", "Δ ppl"]
    headers += ["peak RSS MB"]
    trials = [
        [
            f"{t['factor']:.4g}",
            f"{t['ppl']:.4f}",
            f"{t['ppl_increase']:+.2%}",
            f"{t['flop_fraction']:.4f}",
            "yes" if t["feasible"] else "no",
        ]
        for t in calibration.to_dict()["trials"]
    ]
    halt_config = calibration.policy["halting"]
    page = [
        f"# Decoding under each policy: {args.model}, {args.dtype}",
        "",
        f"Produced by `{command}` on {date} (load average at start {load_average:.2f}; "
        f"{os.cpu_count()} CPU cores). Generated file: edit the benchmark, not this.",
        "",
        f"{len(ids)} prompts (first sentences of WikiText-2 test paragraphs), "
        f"{args.new_tokens} greedy tokens each, no early stop. Dense and policy decode the same "
        "prompts back to back for each row, so `speedup` (decode tokens/s ratio) is from one "
        "run. `decode FLOPs/dense`: counted FLOPs of the decode steps per generated token "
        "(checks, propagated K/V and the LM head included; no padding, since every row feeds "
        "one token per step). `prompt FLOPs/dense`: the same for the prompts' forward, per "
        "real prompt token (at batch > 1 the dense path also runs and counts left padding, "
        "which the adaptive path never runs, so this ratio is fair at batch 1 only). "
        "Agreement: share of positions where the policy's token equals "
        "dense greedy's; `dense ppl of text`: the dense model's perplexity of the policy's "
        "continuations (dense's own in the next column; `Δ ppl` the ratio). SkipDecode "
        "schedules come from `schedule_for_speedup` (`--target-speedup`): decode FLOPs of "
        "1/target of dense, the LM head included.",
        "",
        format_table(headers, table, markdown=True),
        "",
        "![decode](decode.png)",
        "",
        "## Halting calibration",
        "",
        f"Base: `{halting_base(model.config.n_layers)['halting']}`; every threshold scaled "
        "by one factor, searched on "
        f"{args.calibration_prompts} WikiText-2 *validation* prompts x {args.new_tokens} tokens "
        "(batch 8) for the largest factor whose dense perplexity of the continuations is at "
        f"most +1% (dense: {calibration.dense_ppl:.4f}). "
        + (
            f"Chosen: factor {calibration.factor:.4g}, `entropy_bits` "
            f"{halt_config['entropy_bits']:.4g}."
            if calibration.met
            else "No trial met the budget; the closest is used."
        ),
        "",
        format_table(
            ["factor", "dense ppl of text", "Δ", "decode FLOPs/dense", "meets"],
            trials,
            markdown=True,
        ),
        "",
    ]
    (args.out_dir / "decode.md").write_text("\n".join(page), encoding="utf-8")
    plot(rows, args.out_dir / "decode.png")
    print(f"wrote {args.out_dir / 'decode.md'}", file=sys.stderr)
    return 0


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for size, marker in zip(sorted({r["batch_size"] for r in rows}), "os^D", strict=False):
        picked = [r for r in rows if r["batch_size"] == size]
        xs = [r["policy_tokens_per_s"] / r["dense_tokens_per_s"] for r in picked]
        ys = [r["dense_ppl_of_policy"] / r["dense_ppl_of_dense"] for r in picked]
        ax.scatter(xs, ys, marker=marker, label=f"batch {size}")
    ax.set_xlabel("decode tokens/s vs dense (same run)")
    ax.set_ylabel("dense perplexity of the text, vs dense's own")
    ax.set_yscale("log")
    ax.axhline(1.01, color="grey", linewidth=0.8, linestyle="--")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
