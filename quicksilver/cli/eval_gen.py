"""``quicksilver eval-gen``: what a policy changes in generated text, against the dense model
on the same prompts, at each batch size."""

from __future__ import annotations

import argparse

from quicksilver.cli.checks import (
    check_output,
    check_target_speedup,
    check_text_args,
    require_at_least,
    require_positive,
    set_threads,
)
from quicksilver.cli.console import say, show
from quicksilver.cli.generate import check_group_size, mark_group_size_default
from quicksilver.cli.inputs import (
    check_model_args,
    generation_prompts,
    load_llm,
    load_policy_args,
    with_target_speedup,
)
from quicksilver.cli.options import add_dtype, add_policy_args, add_text_args
from quicksilver.eval.generation import evaluate_generation
from quicksilver.eval.report import format_table
from quicksilver.outputs import write_json_atomic
from quicksilver.runtime.cache import check_cache_fits

NAME = "eval-gen"
# Why generation comparisons need two new tokens: what `--max-new-tokens` errors say.
GENERATION_LENGTH_WHY = (
    " to compare generation (the first token comes from the prompt's forward; speed and "
    "FLOPs are measured on the decode steps after it)"
)


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        NAME,
        parents=[common],
        help="what a policy changes in generated text, vs dense",
        description="Greedy continuations under the policy and under the dense model, batch "
        "by batch: token agreement, ROUGE-L, the dense model's perplexity of both texts, "
        "decode tokens/s and counted FLOPs.",
    )
    add_dtype(parser, "bfloat16")
    parser.add_argument(
        "--prompts",
        type=int,
        default=32,
        metavar="N",
        help="number of prompts: the first sentences of the text's paragraphs, or JSONL "
        "lines (default: %(default)s)",
    )
    add_text_args(parser, split_help="dataset split (default: test)", field="prompt")
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[1, 8, 32],
        metavar="N",
        help="one comparison per batch size (default: 1 8 32)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        metavar="N",
        help="tokens per continuation, at least 2 (default: %(default)s)",
    )
    add_policy_args(parser, target_speedup=True)
    mark_group_size_default(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    check_group_size(args, [args.weights])
    require_positive(prompts=args.prompts, max_new_tokens=args.max_new_tokens)
    for size in args.batch_sizes:
        require_positive(batch_sizes=size)
    require_at_least("max_new_tokens", args.max_new_tokens, 2, GENERATION_LENGTH_WHY)
    check_target_speedup(args.target_speedup)
    check_text_args(args)
    check_model_args(args)
    policy = load_policy_args(args)
    json_path = check_output(args.json, args)
    set_threads(args.threads)

    prompts, _ = generation_prompts(args)
    llm = load_llm(args)
    ids = [llm.encode(p) for p in prompts]
    check_cache_fits(
        llm.config,
        llm.model.dtype,
        rows=min(max(args.batch_sizes), len(ids)),
        length=max(map(len, ids)) + args.max_new_tokens - 1,
        fix="use smaller --batch-sizes, a lower --max-new-tokens or shorter prompts",
    )
    policy = with_target_speedup(policy, args.target_speedup, args.max_new_tokens, llm.config)
    if policy.is_off:
        say("note: the policy is dense; both sides will agree exactly")
    say(f"policy: {policy.describe()}; {len(prompts)} prompts")
    results = [
        evaluate_generation(
            llm.model, policy, ids, max_new_tokens=args.max_new_tokens, batch_size=size
        )
        for size in args.batch_sizes
    ]
    headers = ["batch", "agreement", "ROUGE-L", "dense ppl (policy)", "dense ppl (dense)"]
    headers += ["tok/s policy", "tok/s dense", "decode FLOPs/dense", "prompt FLOPs/dense"]
    rows = [
        [
            r.batch_size,
            f"{r.agreement:.3f}",
            f"{r.rouge_l:.3f}",
            f"{r.dense_ppl_of_policy:.2f}",
            f"{r.dense_ppl_of_dense:.2f}",
            f"{r.policy_tokens_per_s:.1f}",
            f"{r.dense_tokens_per_s:.1f}",
            f"{r.policy_flops_per_token / r.dense_flops_per_token:.3f}",
            f"{r.policy_prefill_flops_per_token / r.dense_prefill_flops_per_token:.3f}",
        ]
        for r in results
    ]
    show(format_table(headers, rows))
    if json_path is not None:
        record = {
            "model": args.model,
            "dtype": args.dtype,
            "weights": llm.weights.to_dict(),
            "policy": policy.to_config(),
            "prompts": prompts,
            "results": [r.to_dict() for r in results],
        }
        write_json_atomic(json_path, record)
    return 0
