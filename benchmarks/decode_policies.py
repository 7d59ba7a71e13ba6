"""Decoding under each policy vs dense, at several batch sizes, in one run.

For every policy and batch size, `evaluate_generation` runs dense and policy greedy decoding
back to back on the same prompts (first sentences of WikiText-2 test paragraphs), so the
tokens/s ratio is taken in one run; it also reports counted FLOPs per token, agreement with
dense output, ROUGE-L and the dense model's perplexity of the policy's continuations. Peak RSS
is the process's during each row. Writes docs/results/decode.md, decode.json, decode.png.

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

from quicksilver.accounting import Meter
from quicksilver.eval.datasets import load_eval_text
from quicksilver.eval.generation import evaluate_generation, wikitext_prompts
from quicksilver.eval.report import format_table, write_json_atomic
from quicksilver.models.loading import DEFAULT_MODEL, load
from quicksilver.policies import PolicyStack
from quicksilver.policies.skipdecode import schedule_for_speedup

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


def policies(n_layers: int, new_tokens: int) -> list[tuple[str, PolicyStack]]:
    rows = [("dense", PolicyStack())]
    for target in (1.25, 1.5, 2.0, 3.0):
        schedule = schedule_for_speedup(n_layers, target, new_tokens)
        rows.append((f"SkipDecode, {target}x layer target", PolicyStack([schedule])))
    rows += [
        (
            "halting: lens entropy < 0.01 bit at layer 27 (propagate)",
            PolicyStack.from_config(
                {"halting": {"entropy_bits": 0.01, "min_layer": 27, "interval": 100}}
            ),
        ),
        (
            "halting: relative drift < 0.15 from layer 8 (skip)",
            PolicyStack.from_config(
                {"halting": {"relative_drift": 0.15}, "kv_skip": {"treatment": "skip"}}
            ),
        ),
        (
            "Matryoshka int8 (int8 kernel in decode)",
            PolicyStack.from_config({"matryoshka": {"fixed_bits": 8}}),
        ),
    ]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "results")
    args = parser.parse_args(argv)
    raw = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/decode_policies.py" + (" " + shlex.join(raw) if raw else "")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_average = os.getloadavg()[0]
    torch.set_num_threads(os.cpu_count() or 1)

    loaded = load(args.model, getattr(torch, args.dtype))
    tokenizer = loaded.text_tokenizer()
    prompts = wikitext_prompts(load_eval_text("wikitext-2", "test").text, args.prompts)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows: list[dict[str, Any]] = []
    for label, policy in policies(loaded.model.config.n_layers, args.new_tokens):
        for size in args.batch_sizes:
            print(f"{label}, batch {size}", file=sys.stderr, flush=True)
            with Meter() as meter:
                result = evaluate_generation(
                    loaded.model, policy, ids, max_new_tokens=args.new_tokens, batch_size=size
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
        {"command": command, "date": date, "load_average": load_average, "rows": rows},
    )
    table = [
        [
            r["label"],
            r["batch_size"],
            f"{r['policy_tokens_per_s']:.1f}",
            f"{r['dense_tokens_per_s']:.1f}",
            f"{r['policy_tokens_per_s'] / r['dense_tokens_per_s']:.2f}x",
            f"{r['policy_flops_per_token'] / r['dense_flops_per_token']:.3f}",
            f"{r['agreement']:.3f}",
            f"{r['rouge_l']:.3f}",
            f"{r['dense_ppl_of_policy']:.2f}",
            f"{r['dense_ppl_of_dense']:.2f}",
            f"{r['peak_rss_mb']:.0f}",
        ]
        for r in rows
    ]
    headers = ["policy", "batch", "tok/s", "dense tok/s", "speedup", "FLOPs/dense"]
    headers += ["agreement", "ROUGE-L", "dense ppl of text", "dense ppl (dense)", "peak RSS MB"]
    page = [
        f"# Decoding under each policy: {args.model}, {args.dtype}",
        "",
        f"Produced by `{command}` on {date} (load average at start {load_average:.2f}; "
        f"{os.cpu_count()} CPU cores). Generated file: edit the benchmark, not this.",
        "",
        f"{len(prompts)} prompts (first sentences of WikiText-2 test paragraphs), "
        f"{args.new_tokens} greedy tokens each, no early stop. Dense and policy decode the same "
        "prompts back to back for each row, so `speedup` (decode tokens/s ratio) is from one "
        "run. FLOPs per token are counted over prefill and decode. Agreement: share of positions "
        "where the policy's token equals dense greedy's; `dense ppl of text`: the dense model's "
        "perplexity of the policy's continuations (dense's own in the next column). At "
        "batch > 1, FLOPs/dense also reflects left padding: the dense path runs (and counts) "
        "the padded prompt rows, the adaptive path never runs them.",
        "",
        format_table(headers, table, markdown=True),
        "",
        "![decode](decode.png)",
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
