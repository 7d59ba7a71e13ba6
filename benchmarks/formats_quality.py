"""What each weight format costs in quality: WikiText-2 test perplexity (context 1024, stride
512, the whole split) beside the fp32 model, and greedy agreement with the fp32 model's
continuations; writes docs/results/formats.md and formats.json.

    .venv/bin/python benchmarks/formats_quality.py
    .venv/bin/python benchmarks/formats_quality.py --max-windows 40   # a quick slice

The fp32 reference is the GGUF file dequantised (its blocks in fp32). Where a format holds the
file's blocks as they are (int4 with groups of 32 over Q4_0 / Q4_1 / Q4_K blocks) its gap is
the kernel's bf16 scales and activations and the head's format, not a second quantisation;
every other layer is re-quantised, and the load's own report (which layers, from which GGUF
types, the weight error) is written beside the table.

    .venv/bin/python benchmarks/formats_quality.py --model qwen2.5-coder-0.5b --max-windows 8 \\
        --prompts 8 --out-dir docs/results/qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import quicksilver as qs
from quicksilver.eval.datasets import load_eval_text
from quicksilver.eval.generation import agreement, wikitext_prompts
from quicksilver.eval.report import format_table
from quicksilver.outputs import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "results"
# (label, dtype, weights, head_weights, kernels); the first is the reference. int8 and int4
# run our kernels (activations rounded to int8 per block of 32, quicksilver.kernels) unless
# the label names torch's weight-only kernels (activations as they are).
FORMATS = [
    ("fp32 (reference)", "float32", None, None, "ours"),
    ("bf16", "bfloat16", None, None, "ours"),
    ("bf16, head int8", "bfloat16", None, "int8", "ours"),
    ("bf16, head int8 (torch's kernel)", "bfloat16", None, "int8", "torch"),
    ("int8", "bfloat16", "int8", None, "ours"),
    ("int8 (torch's kernel)", "bfloat16", "int8", None, "torch"),
    ("int4, head int8", "bfloat16", "int4", None, "ours"),
    ("int4, head int8 (torch's kernels)", "bfloat16", "int4", None, "torch"),
    ("int4, head bf16", "bfloat16", "int4", "bfloat16", "ours"),
    ("int4 g64 (re-quantised), head int8", "bfloat16", "int4", None, "ours"),
]


def build_parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (the docs' commands are checked
    against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=qs.DEFAULT_MODEL)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--max-windows", type=int, help="only the first N windows")
    parser.add_argument("--prompts", type=int, default=32, help="greedy continuations")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    return parser


def measure(args: argparse.Namespace, text: str, prompts: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    reference_tokens: list[list[int]] | None = None
    for label, dtype, weights, head, kernel in FORMATS:
        group = (64 if "g64" in label else 32) if "int4" in (weights, head) else None
        print(f"formats: {label}", file=sys.stderr, flush=True)
        os.environ["QUICKSILVER_KERNELS"] = kernel
        llm = qs.load(args.model, dtype=dtype, weights=weights, head_weights=head, group_size=group)
        start = time.perf_counter()
        result = llm.perplexity(
            text,
            context=args.context,
            stride=args.stride,
            batch_size=1,  # one window's rows at a time: through the kernel decoding uses
            max_windows=args.max_windows,
            progress=True,
        )
        seconds = time.perf_counter() - start
        out = llm.generate(prompts, max_new_tokens=args.new_tokens, ignore_eos=True)
        tokens = [c.token_ids for c in out.completions]
        if reference_tokens is None:
            reference_tokens = tokens
        rows.append(
            {
                "label": label,
                "dtype": dtype,
                "weights": llm.weights.to_dict(),
                "perplexity": result.ppl,
                "bits_per_byte": result.bits_per_byte,
                "scored_tokens": result.tokens,
                "eval_seconds": seconds,
                "greedy_agreement": sum(
                    agreement(t, r) for t, r in zip(tokens, reference_tokens, strict=True)
                )
                / len(tokens),
                "linear_weight_mb": sum(m.storage_bytes for m in llm.model.linears()) / 1e6,
                "requantised": llm.requantised.message() if llm.requantised else None,
            }
        )
        del llm
    return rows


def render(command: str, date: str, args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    reference = rows[0]["perplexity"]
    # Bits per byte need the whole text scored; a --max-windows slice has none.
    with_bpb = all(
        isinstance(r["bits_per_byte"], float) and r["bits_per_byte"] == r["bits_per_byte"]
        for r in rows
    )
    headers = ["format", "perplexity", "vs fp32", "bits/byte", "greedy agreement", "linear MB"]
    table = [
        [
            r["label"],
            f"{r['perplexity']:.4f}",
            f"{100 * (r['perplexity'] / reference - 1):+.2f}%",
            f"{r['bits_per_byte']:.4f}" if with_bpb else "",
            f"{100 * r['greedy_agreement']:.1f}%",
            f"{r['linear_weight_mb']:.1f}",
        ]
        for r in rows
    ]
    if not with_bpb:
        headers.pop(3)
        for row in table:
            row.pop(3)
    windows = "every window" if args.max_windows is None else f"the first {args.max_windows}"
    return "\n".join(
        [
            "# Quality of each weight format",
            "",
            f"Generated {date} by:",
            "",
            "```",
            command,
            "```",
            "",
            f"- perplexity: WikiText-2 raw test, context {args.context}, stride {args.stride}, "
            f"{windows} ({rows[0]['scored_tokens']:,} scored tokens), no BOS",
            f"- greedy agreement: share of the fp32 model's greedy tokens matched position by "
            f"position, {args.prompts} WikiText-2 test prompts (first sentences of paragraphs) "
            f"x {args.new_tokens} new tokens, stop tokens ignored",
            "- linear MB: bytes of every linear layer's stored weights (codes, scales, zeros), "
            "LM head included; the bf16 embedding a tied head shares is not in it",
            "- reading it: greedy agreement compounds (after the first different token the "
            "continuations part), so compare each format with bf16, which differs from fp32 by "
            "rounding alone. `int4` with groups of 32 holds a file's Q4_0 / Q4_1 / Q4_K blocks "
            "as they are (only scales and zeros rounded to bf16); every other layer, and every "
            "layer of `int8` and `int4 g64`, is re-quantised from the file's values, so its "
            "error adds to the file's. What each load re-rounded, as it reported it:",
            "",
            *[f"  - {r['label']}: {r['requantised']}" for r in rows if r["requantised"]],
            "",
            format_table(headers, table, markdown=True),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    command = shlex.join([".venv/bin/python", "benchmarks/formats_quality.py", *raw])
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        text = load_eval_text("wikitext-2", "test").text
        prompts = wikitext_prompts(text, args.prompts)
        rows = measure(args, text, prompts)
    except qs.QuicksilverError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        args.out_dir / "formats.json", {"command": command, "date": date, "rows": rows}
    )
    markdown = render(command, date, args, rows)
    (args.out_dir / "formats.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
