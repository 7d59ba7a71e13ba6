"""How many tokens could halt at all: an upper bound on halting's savings per lens.

One dense forward per window of WikiText-2 test keeps every checked layer's states; each is
read through the logit lens (the frozen model's head) and through the exit heads of an
adapter (`quicksilver adapt exits`). For a token halted at layer l, its prediction becomes
the lens's: the loss on the next token changes by NLL_lens - NLL_final. Halting the tokens
whose lens entropy (whole vocabulary) is lowest first, the largest share that keeps the
perplexity increase within a budget is found with the threshold chosen on the very same
tokens, and no effect on other tokens is counted (halted tokens' K/V in later layers are the
frozen state's, which costs more): an optimistic bound, not a policy. "Checks" halts each
token at the first checked layer where its entropy is under one threshold (the policy's
rule); the threshold is searched on a grid. Replaces (or appends) this benchmark's section
of docs/results/adapters.md.

    .venv/bin/python benchmarks/exit_heads_bound.py --adapter ADAPTER.safetensors --threads 2
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from halting_exits import write_section

import quicksilver as qs
from quicksilver.eval.datasets import load_eval_text
from quicksilver.text import encode_stream

HEADING = "## Exit heads: how many tokens could halt (an upper bound)"
LN2 = math.log(2)


def build_parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (the docs' commands are checked
    against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=qs.DEFAULT_MODEL)
    parser.add_argument("--adapter", required=True, help="exit heads (`quicksilver adapt exits`)")
    parser.add_argument("--layers", default="10,14,18,22,26,28", help="checked layers")
    parser.add_argument("--windows", type=int, default=4, help="windows of --context tokens")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--budgets", default="0.01,0.05", help="perplexity increases")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="docs/results/adapters.md")
    return parser


@torch.inference_mode()
def lens_readings(llm: qs.LLM, ids: list[int], layers: list[int], windows: int, context: int):
    """Per lens and checked layer, for every token: entropy (bits), NLL_lens - NLL_final and
    whether the lens's argmax is the final one."""
    model, heads = llm.model, llm.model.exit_heads
    out = {name: {layer: ([], [], []) for layer in layers} for name in ("logit lens", "exit heads")}
    for w in range(windows):
        tokens = torch.tensor([ids[w * context : (w + 1) * context + 1]])
        states = {}
        cache = llm.engine.new_cache(1, context)

        def keep(layer: int, h: torch.Tensor, states: dict = states) -> None:
            if layer in layers:
                states[layer] = h[0].clone()

        final = llm.engine.forward(tokens[:, :-1], cache, logits_at="all", observe=keep)[0]
        targets = tokens[0, 1:]
        final_nll = F.cross_entropy(final.float(), targets, reduction="none")
        final_top = final.argmax(-1)
        for layer in layers:
            for name, mapped in (("logit lens", False), ("exit heads", True)):
                h = heads(states[layer], layer) if mapped else states[layer]
                logp = torch.log_softmax(model.logits(h).float(), dim=-1)
                entropy = -(logp.exp() * logp).sum(-1) / LN2
                change = -logp.gather(1, targets[:, None])[:, 0] - final_nll
                out[name][layer][0].append(entropy)
                out[name][layer][1].append(change)
                out[name][layer][2].append(logp.argmax(-1) == final_top)
    return {
        name: {layer: tuple(torch.cat(parts) for parts in pair) for layer, pair in by.items()}
        for name, by in out.items()
    }


def best_share(entropy: torch.Tensor, change: torch.Tensor, budget: float) -> float:
    """The largest share of tokens, lowest entropy first, whose summed loss change keeps the
    perplexity within (1 + budget) times."""
    order = torch.argsort(entropy)
    allowed = math.log1p(budget) * len(entropy)
    within = (torch.cumsum(change[order].double(), 0) <= allowed).nonzero()
    return 0.0 if not len(within) else (int(within.max()) + 1) / len(entropy)


def checks_share(readings: dict, layers: list[int], n_layers: int, budget: float) -> tuple:
    """(layer FLOPs saved, threshold bits) of the best single threshold under the policy's
    rule: halt at the first checked layer whose entropy is under it."""
    best = (0.0, 0.0)
    for bits in torch.logspace(-4, 1, 60).tolist():
        halted = torch.zeros_like(readings[layers[0]][0], dtype=torch.bool)
        change, saved = 0.0, 0.0
        for layer in layers:
            entropy, delta, _ = readings[layer]
            now = (entropy < bits) & ~halted
            change += float(delta[now].double().sum())
            saved += int(now.sum()) * (n_layers - 1 - layer)
            halted |= now
        if change <= math.log1p(budget) * len(halted):
            best = max(best, (saved / (len(halted) * n_layers), bits))
    return best


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    budgets = [float(x) for x in args.budgets.split(",")]
    llm = qs.load(args.model, adapter=args.adapter)
    ids = encode_stream(llm.inputs.text_tokenizer(), load_eval_text("wikitext-2", "test").text)
    readings = lens_readings(llm, ids, layers, args.windows, args.context)
    n = llm.config.n_layers
    shown = " / ".join(f"<= {b:+.0%}" for b in budgets)
    lines = [
        HEADING,
        "",
        f"Command: `.venv/bin/python {shlex.join(sys.argv)}`",
        "",
        f"{args.windows} windows of {args.context} tokens of WikiText-2 test "
        f"({args.windows * args.context} tokens). Per checked layer: the share of tokens "
        f"that could stop there ({shown} perplexity, the best threshold on these tokens), "
        "what stopping them there saves of the layer FLOPs, and the tokens whose lens "
        "argmax is the final argmax:",
        "",
        f"| layer | lens | mean NLL change (nats) | top-1 = final | could halt ({shown}) "
        "| layer FLOPs saved |",
        "| ---: | --- | ---: | ---: | --- | --- |",
    ]
    for layer in layers:
        for name in readings:
            entropy, change, top = readings[name][layer]
            shares = [best_share(entropy, change, b) for b in budgets]
            saved = [s * (n - 1 - layer) / n for s in shares]
            agree = float(top.float().mean())
            lines.append(
                f"| {layer} | {name} | {float(change.mean()):+.3f} | {agree:.1%} "
                f"| {' / '.join(f'{s:.1%}' for s in shares)} "
                f"| {' / '.join(f'{s:.1%}' for s in saved)} |"
            )
    lines += ["", f"The policy's rule over checked layers {layers}:", ""]
    for name in readings:
        for b in budgets:
            saved, bits = checks_share(readings[name], layers, n, b)
            lines.append(
                f"- {name}, <= {b:+.0%}: {saved:.1%} of layer FLOPs saved at best "
                f"(entropy < {bits:.3g} bits)"
            )
    write_section(Path(args.output), lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
