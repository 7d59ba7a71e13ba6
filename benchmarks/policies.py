"""QuickSilver's mechanisms on a frozen model: perplexity, counted FLOPs, wall-clock, memory.

For each dtype, in one process: the dense model, each mechanism alone, the paper's literal
defaults, and combined policies calibrated on WikiText-2 *validation* for several budgets,
all evaluated on WikiText-2 test and the C4 validation sample (the first --windows windows
of each, context 1024, stride 512). Speedups are against the dense engine timed back to back
with each policy on the same windows (twice, best of each). Also records why the mechanisms
cost quality on this model: logit-lens calibration and per-layer drift.

Writes docs/results/policies.md, policies.json and policies-pareto.png.

    .venv/bin/python benchmarks/policies.py                    # float32 and bfloat16
    .venv/bin/python benchmarks/policies.py --dtypes float32 --windows 4 --calib-windows 2
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import quicksilver as qs
from quicksilver.eval.calibrate import calibrate, perplexity_measure
from quicksilver.eval.datasets import load_eval_text
from quicksilver.eval.report import format_table
from quicksilver.outputs import write_json_atomic
from quicksilver.policies import PRESETS
from quicksilver.runtime.engine import Engine
from quicksilver.text import encode_stream

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "results"
MB = 1024 * 1024


def single_rows(depth: int) -> list[tuple[str, dict[str, Any]]]:
    """Each mechanism alone, at settings picked from the drift/entropy measurements below
    (mild enough to show the trade-off, not tuned on test). Layers are placed by depth (for
    SmolLM2's 30 layers: 8, 15, 16, 27), so another model gets the same shape."""
    early, middle, past_middle, late = (
        round(0.27 * depth),
        depth // 2,
        round(0.53 * depth),
        depth - 3,
    )
    return [
        (
            f"halting: relative drift < 0.15 from layer {early}",
            {"halting": {"relative_drift": 0.15, "min_layer": early}},
        ),
        (
            f"halting: lens entropy < 0.01 bit, one check at layer {late}",
            {"halting": {"entropy_bits": 0.01, "min_layer": late, "interval": 100}},
        ),
        (
            f"halting: shortlist entropy (first 2048 ids) < 0.01 bit at layer {late}",
            {
                "halting": {
                    "entropy_bits": 0.01,
                    "lens_vocab": 2048,
                    "min_layer": late,
                    "interval": 100,
                }
            },
        ),
        (
            "halting (drift 0.15) + kv_skip skip",
            {
                "halting": {"relative_drift": 0.15, "min_layer": early},
                "kv_skip": {"treatment": "skip"},
            },
        ),
        (
            "halting (drift 0.15) + kv_skip zero",
            {
                "halting": {"relative_drift": 0.15, "min_layer": early},
                "kv_skip": {"treatment": "zero"},
            },
        ),
        (
            f"fusion: relative L2 to a previous token < 0.35, from layer {past_middle}",
            {"fusion": {"threshold": 0.35, "start_layer": past_middle}},
        ),
        ("matryoshka: int8, every token and layer", {"matryoshka": {"fixed_bits": 8}}),
        ("matryoshka: int4, every token and layer", {"matryoshka": {"fixed_bits": 4}}),
        ("matryoshka: int2, every token and layer", {"matryoshka": {"fixed_bits": 2}}),
        (
            "matryoshka: int4 with groups of 32",
            {"matryoshka": {"fixed_bits": 4, "group_size": 32}},
        ),
        (
            f"matryoshka: adaptive 8/4/2 at layer {middle} (entropy > 2 / < 0.5 bit)",
            {"matryoshka": {"entropy_high": 2.0, "entropy_low": 0.5, "decision_layer": middle}},
        ),
        ("paper-literal defaults (drift 0.045, entropy 1.15 bit, zero K/V)", PRESETS["paper"]),
    ]


def combined(depth: int) -> dict[str, Any]:
    """The combined policy whose thresholds calibration scales (one knob for all of them)."""
    return {
        "halting": {"relative_drift": 0.15, "min_layer": round(0.27 * depth)},
        "fusion": {"threshold": 0.35, "start_layer": round(0.53 * depth)},
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (the docs' commands are checked
    against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=qs.DEFAULT_MODEL)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--windows", type=int, default=8, help="windows per test set")
    parser.add_argument("--calib-windows", type=int, default=8, help="validation windows")
    parser.add_argument(
        "--quality-budgets", type=float, nargs="*", default=[0.01, 0.05], metavar="X"
    )
    parser.add_argument("--flop-budgets", type=float, nargs="*", default=[0.6], metavar="F")
    parser.add_argument("--timing-windows", type=int, default=3, help="windows per timing run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    return parser


def perplexity(llm: qs.LLM, ids: list[int], windows: int, args) -> qs.PerplexityResult:
    """The benchmark's one evaluation setting: context 1024, stride 512, the first windows."""
    return llm.perplexity(
        ids, context=1024, stride=512, batch_size=args.batch_size, max_windows=windows
    )


def paired_speedup(llm: qs.LLM, policy: qs.Policy, ids: list[int], args) -> dict[str, float]:
    """Dense and policy timed back to back on the same windows, twice, best of each: on a
    shared machine only such adjacent ratios are meaningful."""
    best = {"dense": math.inf, "policy": math.inf}
    for _ in range(2):
        for name, chosen in (("dense", None), ("policy", policy)):
            with llm.use(chosen):
                seconds = perplexity(llm, ids, args.timing_windows, args).seconds
            best[name] = min(best[name], seconds)
    return {
        "dense_seconds": best["dense"],
        "policy_seconds": best["policy"],
        "speedup": best["dense"] / best["policy"],
    }


def evaluate(llm: qs.LLM, policy: qs.Policy, texts: dict, args) -> dict[str, Any]:
    out = {}
    with llm.use(policy):
        for name, ids in texts.items():
            r = perplexity(llm, ids, args.windows, args)
            out[name] = {
                "ppl": r.ppl,
                "tokens": r.tokens,
                "flops_total": r.flops["total"],
                "flops": r.flops,
                "seconds": r.seconds,
                "peak_rss_mb": r.peak_rss_bytes / MB,
            }
    return out


@torch.inference_mode()
def diagnostics(model, ids: list[int]) -> dict[str, Any]:
    """Logit-lens calibration and per-layer update sizes on 2 x 1024 validation tokens."""
    engine = Engine(model)
    tokens = torch.tensor(ids[:2048]).view(2, 1024)
    states: list[torch.Tensor] = []
    engine.forward(
        tokens,
        engine.new_cache(2, 1024),
        logits_at="all",
        observe=lambda _layer, h: states.append(h.clone()),
    )
    drift = []
    previous = model.embed_tokens(tokens, torch.arange(1024).expand(2, -1))
    for new in states:
        rel = ((new - previous).float().norm(dim=-1) / new.float().norm(dim=-1))[:, 1:].flatten()
        drift.append([float(x) for x in rel.quantile(torch.tensor([0.01, 0.1, 0.5]))])
        previous = new
    h = states[-1]
    targets = tokens[:, 1:]
    final = torch.log_softmax(model.logits(h[:, :-1]).float(), -1)
    nll_final = -final.gather(-1, targets[..., None])[..., 0]
    lens = []
    depth = len(model.blocks)
    for layer in sorted({int(depth * f) for f in (0.55, 0.67, 0.8, 0.9)}):
        logp = torch.log_softmax(model.logits(states[layer][:, :-1]).float(), -1)
        entropy = -(logp.exp() * logp).sum(-1) / math.log(2)
        nll = -logp.gather(-1, targets[..., None])[..., 0]
        for threshold in (0.01, 0.1, 0.5):
            sel = entropy < threshold
            if not bool(sel.any()):
                continue
            agree = (logp.argmax(-1) == final.argmax(-1))[sel].float().mean()
            lens.append(
                {
                    "layer": layer,
                    "entropy_below": threshold,
                    "fraction": float(sel.float().mean()),
                    "agrees_with_final": float(agree),
                    "nll_lens": float(nll[sel].mean()),
                    "nll_final": float(nll_final[sel].mean()),
                    "mean_nll_change": float((nll[sel] - nll_final[sel]).sum() / nll.numel()),
                }
            )
    return {"relative_drift_quantiles_1_10_50": drift, "lens": lens}


def run_dtype(args, dtype_name: str, say) -> dict[str, Any]:
    llm = qs.load(args.model, dtype=dtype_name)

    def stream(dataset: str, split: str) -> list[int]:
        # Tokenised once and reused by every row (what llm.perplexity(text) would redo).
        return encode_stream(llm.tokenizer, load_eval_text(dataset, split).text)

    texts = {
        "wikitext-2 test": stream("wikitext-2", "test"),
        "c4 validation": stream("c4", "validation"),
    }
    calib_ids = stream("wikitext-2", "validation")
    rows: list[dict[str, Any]] = []

    def add(label: str, policy: qs.Policy, extra: dict | None = None) -> None:
        say(f"[{dtype_name}] {label}")
        rows.append(
            {
                "label": label,
                "policy": policy.to_config(),
                "results": evaluate(llm, policy, texts, args),
                "timing": paired_speedup(llm, policy, texts["wikitext-2 test"], args),
                **(extra or {}),
            }
        )

    add("dense", qs.Policy())
    depth = llm.config.n_layers
    for label, config in single_rows(depth):
        add(label, qs.Policy.from_config(config))
    base = qs.Policy.from_config(combined(depth))
    calibrations = []
    budgets = [("max_ppl_increase", b) for b in args.quality_budgets]
    budgets += [("flop_fraction", b) for b in args.flop_budgets]
    for kind, value in budgets:
        say(f"[{dtype_name}] calibrating the combined policy for {kind} = {value}")
        # The measure sets each trial's policy on the engine; the block puts dense back.
        with llm.use(None):
            measure = perplexity_measure(
                llm.engine,
                calib_ids,
                context=1024,
                stride=512,
                batch_size=args.batch_size,
                max_windows=args.calib_windows,
            )
            result = calibrate(
                measure,
                base,
                log=lambda m: say(f"    {m}"),
                **{kind: value},
            )
        calibrations.append(result.to_dict())
        budget = f"+{value:.0%} ppl" if kind == "max_ppl_increase" else f"{value:.0%} FLOPs"
        met = "" if result.met else " (budget not met on validation)"
        add(
            f"combined, calibrated for {budget}{met}",
            qs.Policy.from_config(result.policy),
            {"calibration": {"budget": result.budget, "factor": result.factor, "met": result.met}},
        )
    return {
        "dtype": dtype_name,
        "rows": rows,
        "calibrations": calibrations,
        "diagnostics": diagnostics(llm.model, calib_ids) if dtype_name == "float32" else None,
    }


def render(command: str, date: str, load: float, runs: list[dict], args) -> str:
    lines = [
        f"# Adaptive policies on {args.model}: what they save and what they cost",
        "",
        f"Produced by `{command}` on {date} (load average at start {load:.2f}; "
        f"{os.cpu_count()} CPU cores). Generated file: edit the benchmark, not this.",
        "",
        f"First {args.windows} windows (context 1024, stride 512) of WikiText-2 test and of the C4 "
        f"validation sample; calibration on the first {args.calib_windows} windows of WikiText-2 "
        "validation only. FLOP fraction = counted FLOPs (layers, attention pairs that ran, K/V "
        "projections of halted tokens, LM head, and every check such as logit-lens entropies) / "
        "the dense run's. Speedup = dense / policy wall-clock on the first "
        f"{args.timing_windows} WikiText-2 test windows, the two timed back to back twice (best "
        "of each), so machine load cancels out. Peak RSS is the whole process (weights included) "
        "during the row's runs; memory that earlier rows freed (Matryoshka's quantised copies) "
        "can stay with the allocator, so rows after them read high.",
        "",
    ]
    for run in runs:
        rows = run["rows"]
        names = list(rows[0]["results"])
        header = ["policy"]
        for name in names:
            header += [f"{name} ppl", "Δ ppl", "FLOP frac"]
        header += ["speedup", "peak RSS MB"]
        table = []
        for row in rows:
            cells = [row["label"]]
            for name in names:
                res = row["results"][name]
                dense_ppl = rows[0]["results"][name]["ppl"]
                cells += [
                    f"{res['ppl']:.4f}",
                    f"{res['ppl'] / dense_ppl - 1:+.2%}",
                    f"{res['flops_total'] / rows[0]['results'][name]['flops_total']:.3f}",
                ]
            cells.append(f"{row['timing']['speedup']:.2f}x")
            cells.append(f"{max(r['peak_rss_mb'] for r in row['results'].values()):.0f}")
            table.append(cells)
        lines += [f"## {run['dtype']}", "", format_table(header, table, markdown=True), ""]
        lines += ["Calibration trials (WikiText-2 validation):", ""]
        trial_rows = []
        for cal in run["calibrations"]:
            budget = ", ".join(f"{k} {v}" for k, v in cal["budget"].items())
            for t in cal["trials"]:
                trial_rows.append(
                    [
                        budget,
                        f"{t['factor']:.4g}",
                        f"{t['ppl']:.4f}",
                        f"{t['ppl_increase']:+.2%}",
                        f"{t['flop_fraction']:.3f}",
                        "yes" if t["feasible"] else "no",
                    ]
                )
        lines += [
            format_table(
                ["budget", "factor", "ppl", "Δ ppl", "FLOP frac", "meets"],
                trial_rows,
                markdown=True,
            ),
            "",
        ]
        if run["diagnostics"]:
            diag = run["diagnostics"]
            lines += [
                "### Why: the logit lens is confidently wrong, and every token keeps moving",
                "",
                "Tokens whose logit-lens entropy at a layer is below a threshold: how often the "
                "lens's top token equals the final layer's, their mean NLL of the true next "
                "token under the lens vs the full model, and the change in the mean NLL over "
                "all tokens if exactly those tokens took the lens prediction (2 x 1024 WikiText-2 "
                "validation tokens, float32).",
                "",
            ]
            lens_rows = [
                [
                    d["layer"],
                    d["entropy_below"],
                    f"{d['fraction']:.3f}",
                    f"{d['agrees_with_final']:.3f}",
                    f"{d['nll_lens']:.2f}",
                    f"{d['nll_final']:.2f}",
                    f"{d['mean_nll_change']:+.4f}",
                ]
                for d in diag["lens"]
            ]
            lines += [
                format_table(
                    [
                        "layer",
                        "entropy <",
                        "share",
                        "agrees",
                        "NLL lens",
                        "NLL final",
                        "Δ mean NLL",
                    ],
                    lens_rows,
                    markdown=True,
                ),
                "",
                "Relative update ||h_l - h_(l-1)|| / ||h_l|| per layer (1st / 10th / 50th "
                "percentile over tokens, first token excluded):",
                "",
            ]
            drift_rows = [
                [i, *(f"{q:.3f}" for q in quantiles)]
                for i, quantiles in enumerate(diag["relative_drift_quantiles_1_10_50"])
            ]
            lines += [format_table(["layer", "p1", "p10", "p50"], drift_rows, markdown=True), ""]
    lines += ["![Pareto](policies-pareto.png)", ""]
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    markers = {"wikitext-2 test": "o", "c4 validation": "s"}
    colors = {"float32": "tab:blue", "bfloat16": "tab:orange"}
    for run in runs:
        rows = run["rows"]
        for name, marker in markers.items():
            dense = rows[0]["results"][name]
            xs_flops, xs_time, ys = [], [], []
            for row in rows:
                res = row["results"][name]
                xs_flops.append(res["flops_total"] / dense["flops_total"])
                xs_time.append(1 / row["timing"]["speedup"])
                ys.append(100 * (res["ppl"] / dense["ppl"] - 1))
            label = f"{run['dtype']}, {name}"
            for ax, xs in ((axes[0], xs_flops), (axes[1], xs_time)):
                ax.scatter(xs, ys, marker=marker, color=colors.get(run["dtype"]), label=label)
    for ax, xlabel in zip(
        axes, ("counted FLOPs / dense", "wall-clock / dense (same run)"), strict=True
    ):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity increase vs dense (%)")
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xscale("log")
        ax.axhline(1, color="grey", linewidth=0.8, linestyle="--")
        ax.axvline(0.6, color="grey", linewidth=0.8, linestyle=":")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{model}, every row of policies.md (lower left is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    command = "python benchmarks/policies.py" + (
        " " + shlex.join(argv if argv is not None else sys.argv[1:])
        if (argv if argv is not None else sys.argv[1:])
        else ""
    )
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    runs = [run_dtype(args, dtype, say) for dtype in args.dtypes]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        args.out_dir / "policies.json",
        {
            "command": command,
            "date": date,
            "load_average": load,
            "settings": {k: v for k, v in vars(args).items() if k != "out_dir"},
            "runs": runs,
        },
    )
    plot(runs, args.out_dir / "policies-pareto.png", args.model)
    page = render(command, date, load, runs, args)
    (args.out_dir / "policies.md").write_text(page, encoding="utf-8")
    say(f"wrote {args.out_dir / 'policies.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
