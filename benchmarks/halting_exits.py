"""Dynamic Token Halting through the logit lens vs through trained exit heads.

For each signal (the frozen model's logit lens; the same lens read through the exit heads of
an adapter `quicksilver adapt exits` wrote), the halting policy's thresholds are calibrated
on WikiText-2 validation for at most --budget perplexity increase (as `quicksilver calibrate
--max-ppl-increase` does), then the calibrated policy (or the calibration's closest trial)
and fixed thresholds (the frontier) are evaluated on WikiText-2 test windows: perplexity
against the dense model's on the same windows, layer FLOPs saved (layer matmuls and
attention, counted, against the dense model's on the same forwards), all counted FLOPs
(checks and exit heads included) and wall-clock against a dense run of the same windows
just before each row (the machine may be shared). Replaces (or appends) this benchmark's
section of docs/results/adapters.md.

    .venv/bin/python benchmarks/halting_exits.py --adapter ADAPTER.safetensors --threads 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

import quicksilver as qs
from quicksilver.eval import calibrate as calibration
from quicksilver.eval.datasets import load_eval_text
from quicksilver.eval.perplexity import PerplexityResult
from quicksilver.text import encode_stream

HEADING = "## Halting: logit lens vs exit heads"


def build_parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (the docs' commands are checked
    against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=qs.DEFAULT_MODEL)
    parser.add_argument("--adapter", required=True, help="exit heads (`quicksilver adapt exits`)")
    parser.add_argument("--entropy-bits", type=float, default=0.5, help="before calibration")
    parser.add_argument("--lens-vocab", type=int, default=2048, help="0: the whole vocabulary")
    parser.add_argument("--min-layer", type=int, default=10)
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.01, help="calibration ppl increase")
    parser.add_argument("--calibration-windows", type=int, default=8)
    parser.add_argument("--test-windows", type=int, default=16)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="bisection steps")
    parser.add_argument(
        "--frontier-bits", default="0.01,0.03,0.1,0.3,1", help="more thresholds to test"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="docs/results/adapters.md")
    parser.add_argument("--json", help="also write every measurement here")
    return parser


def base_policy(args: argparse.Namespace) -> qs.Policy:
    halting = {
        "entropy_bits": args.entropy_bits,
        "min_layer": args.min_layer,
        "interval": args.interval,
    }
    if args.lens_vocab:
        halting["lens_vocab"] = args.lens_vocab
    return qs.load_policy({"halting": halting})


def figures(result: PerplexityResult, dense: PerplexityResult, paired: float) -> dict:
    """Perplexity, layer FLOPs saved, all counted FLOPs / dense and time of one run
    (``paired``: the dense model's seconds on the same windows just before it)."""
    flops = result.flops
    layer, dense_layer = flops["matmul"] + flops["attention"], flops["dense"] - flops["head"]
    return {
        "ppl": result.ppl,
        "ppl_increase": result.ppl / dense.ppl - 1,
        "layer_flops_saved": 1 - layer / dense_layer,
        "flop_fraction": flops["total"] / flops["dense"],
        "seconds": result.seconds,
        "speedup": paired / result.seconds,
    }


def signal_rows(llm: qs.LLM, name: str, args, val_ids, test_ids, dense) -> tuple[list, dict]:
    """Calibrate ``llm``'s halting on validation, then evaluate the frontier on test."""
    measure = calibration.perplexity_measure(
        llm.engine,
        val_ids,
        context=args.context,
        stride=args.stride,
        max_windows=args.calibration_windows,
    )
    found = calibration.calibrate(
        measure, base_policy(args), max_ppl_increase=args.budget, steps=args.steps
    )
    rows = []
    points = [("calibrated" if found.met else "calibration's closest", found.factor)]
    points += [("fixed", float(b) / args.entropy_bits) for b in args.frontier_bits.split(",")]
    for label, factor in points:
        policy = base_policy(args).scaled(factor)
        paired = evaluate(llm, None, test_ids, args).seconds  # a shared machine: time in pairs
        result = evaluate(llm, policy, test_ids, args)
        bits = policy.to_config()["halting"]["entropy_bits"]
        rows.append({"signal": name, "point": label, "entropy_bits": bits,
                     **figures(result, dense, paired)})  # fmt: skip
    return rows, found.to_dict()


def evaluate(llm: qs.LLM, policy, ids, args) -> PerplexityResult:
    return llm.perplexity(
        ids, context=args.context, stride=args.stride, max_windows=args.test_windows, policy=policy
    )


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| signal | thresholds | entropy < bits | test ppl | vs dense | layer FLOPs saved "
        "| all FLOPs / dense | wall-clock vs dense |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['signal']} | {r['point']} | {r['entropy_bits']:.4g} | {r['ppl']:.3f} "
            f"| {r['ppl_increase']:+.2%} | {r['layer_flops_saved']:.1%} "
            f"| {r['flop_fraction']:.3f} | {r['speedup']:.2f}x |"
        )
    return lines


def trial_line(name: str, found: dict, bits: float) -> str:
    trials = sorted(found["trials"], key=lambda t: -t["factor"])
    shown = "; ".join(
        f"{t['factor'] * bits:.3g} bits: {t['ppl_increase']:+.1%}, {t['flop_fraction']:.3f}"
        for t in trials
    )
    verdict = "met" if found["met"] else "no threshold met the budget"
    return f"- {name} ({verdict}): {shown}"


def write_section(path: Path, lines: list[str]) -> None:
    """Put ``lines`` (a section: its heading first) in place of the page's section of that
    heading, or append them."""
    old = path.read_text().splitlines() if path.exists() else []
    if lines[0] in old:
        start = old.index(lines[0])
        end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
        new = old[:start] + lines + ([""] + old[end:] if end < len(old) else [])
    else:
        new = old + ([""] if old else []) + lines
    path.write_text("\n".join(new) + "\n")


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    lens_llm = qs.load(args.model)
    exits_llm = qs.load(args.model, adapter=args.adapter)
    tokenizer = lens_llm.inputs.text_tokenizer()
    val_ids, test_ids = (
        encode_stream(tokenizer, load_eval_text("wikitext-2", split).text)
        for split in ("validation", "test")
    )
    dense = evaluate(lens_llm, None, test_ids, args)
    rows, calibrations = [], {}
    for name, llm in (("logit lens", lens_llm), ("exit heads", exits_llm)):
        found_rows, calibrations[name] = signal_rows(llm, name, args, val_ids, test_ids, dense)
        rows += found_rows
    dense_again = evaluate(lens_llm, None, test_ids, args)
    lines = [
        HEADING,
        "",
        f"Command: `.venv/bin/python {shlex.join(sys.argv)}`",
        "",
        f"Policy: {base_policy(args).describe()}, every threshold scaled by the factor "
        f"calibrated on WikiText-2 validation ({args.calibration_windows} windows of "
        f"{args.context} tokens, stride {args.stride}) for <= {args.budget:+.0%} perplexity; "
        f"test: the first {args.test_windows} such windows of WikiText-2 test ({dense.tokens} "
        f"tokens), dense ppl {dense.ppl:.3f} in {dense.seconds:.1f} s (again after the "
        f"policies: {dense_again.seconds:.1f} s).",
        "",
        *table(rows),
        "",
        "Calibration trials on validation (entropy threshold: perplexity increase, all counted "
        "FLOPs / dense):",
        "",
        *(trial_line(name, found, args.entropy_bits) for name, found in calibrations.items()),
    ]
    write_section(Path(args.output), lines)
    print("\n".join(lines))
    if args.json:
        record = {"rows": rows, "calibration": calibrations, "dense": dense.to_dict()}
        Path(args.json).write_text(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
