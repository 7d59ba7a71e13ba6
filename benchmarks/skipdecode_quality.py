"""What SkipDecode's trained adapter does to generated text, at batch 1 and 8.

The unadapted model generates greedily from the first sentences of WikiText-2 test
paragraphs (the reference); then, on the same prompts and batches, the unadapted model under
the adapter's own SkipDecode schedule (frozen) and the adapted model (LoRA merged at load)
under it. Each is compared with the reference: token agreement, ROUGE-L, the unadapted dense
model's perplexity of the continuations, decode tokens/s over the reference's (taken in the
same run) and counted decode GFLOP per token. Replaces (or appends) this benchmark's section
of docs/results/adapters.md.

    .venv/bin/python benchmarks/skipdecode_quality.py --adapter ADAPTER.safetensors --threads 2
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from halting_exits import write_section

import quicksilver as qs
from quicksilver import adapt
from quicksilver.eval.datasets import load_eval_text
from quicksilver.eval.generation import DenseReference, wikitext_prompts

HEADING = "## SkipDecode adapter: generated text"


def build_parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (the docs' commands are checked
    against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=qs.DEFAULT_MODEL)
    parser.add_argument("--adapter", required=True, help="`quicksilver adapt skipdecode`'s file")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--samples", type=int, default=3, help="continuations shown")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="docs/results/adapters.md")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    record = adapt.read_adapter(args.adapter).record
    policy = qs.Policy.from_config(record["schedule"])
    new_tokens = int(record["new_tokens"])  # the generation length the schedule was trained for
    frozen = qs.load(args.model)
    adapted = qs.load(args.model, adapter=args.adapter)
    texts = wikitext_prompts(load_eval_text("wikitext-2", "test").text, args.prompts)
    prompts = [frozen.encode(text) for text in texts]
    lines = [
        HEADING,
        "",
        f"Command: `.venv/bin/python {shlex.join(sys.argv)}`",
        "",
        f"Adapter: {record['steps']} steps, {record['tokens']} tokens; schedule "
        f"{policy.describe()}. {len(prompts)} WikiText-2 test prompts x {new_tokens} greedy "
        "tokens; every figure is against the unadapted dense model's own continuations "
        "(perplexity: the unadapted dense model's of each text; speed: over dense's in the "
        "same run).",
        "",
        "| batch | model | agreement | ROUGE-L | dense ppl of text | vs dense's own "
        "| decode tok/s | vs dense | GFLOP/token |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for batch in args.batch_sizes:
        reference = DenseReference(
            frozen.model, prompts, max_new_tokens=new_tokens, batch_size=batch
        )
        own = reference.ppl
        lines.append(
            f"| {batch} | dense | 1.000 | 1.000 | {own:.2f} | 1.00x "
            f"| {reference.tokens_per_s:.1f} | 1.00x | {reference.flops_per_token / 1e9:.3f} |"
        )
        for name, model in (("schedule, frozen", None), ("schedule, adapted", adapted.model)):
            q = reference.measure(policy, model=model)
            lines.append(
                f"| {batch} | {name} | {q.agreement:.3f} | {q.rouge_l:.3f} "
                f"| {q.dense_ppl_of_policy:.2f} | {q.dense_ppl_of_policy / own:.2f}x "
                f"| {q.policy_tokens_per_s:.1f} "
                f"| {q.policy_tokens_per_s / q.dense_tokens_per_s:.2f}x "
                f"| {q.policy_flops_per_token / 1e9:.3f} |"
            )
    lines += ["", f"The first {args.samples} continuations (batch 1, first 160 characters):", ""]
    for text in texts[: args.samples]:
        lines.append(f"- prompt: {text!r}")
        for name, llm, rule in (
            ("dense", frozen, None),
            ("frozen", frozen, policy),
            ("adapted", adapted, policy),
        ):
            out = llm.generate(text, max_new_tokens=new_tokens, policy=rule).text
            lines.append(f"  - {name}: `{out[:160]!r}`")
    write_section(Path(args.output), lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
