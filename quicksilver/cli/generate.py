"""``quicksilver generate``: continue prompts, one streamed or several as a batch."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable

import quicksilver as qs
from quicksilver.accounting import Meter
from quicksilver.cli.checks import (
    check_output,
    check_target_speedup,
    require_positive,
    set_threads,
)
from quicksilver.cli.console import printable, say, show
from quicksilver.cli.inputs import (
    check_model_args,
    check_speculative_policy,
    load_llm,
    load_policy_args,
    prepare_drafting,
    read_prompts,
    speculative_setting,
    with_target_speedup,
)
from quicksilver.cli.options import add_dtype, add_policy_args, add_speculative_args
from quicksilver.errors import QuicksilverError
from quicksilver.outputs import write_json_atomic
from quicksilver.runtime.cache import check_cache_fits

NAME = "generate"


class DefaultGroupSize(int):
    """--group-size's default, told apart from the same number given on the command line:
    argparse turns a given value into a plain ``int`` and keeps a default as it is."""


def mark_group_size_default(parser: argparse.ArgumentParser) -> None:
    """Make ``check_group_size`` able to tell whether --group-size was given."""
    parser.set_defaults(group_size=DefaultGroupSize(parser.get_default("group_size")))


def check_group_size(args: argparse.Namespace, formats: Iterable[str | None]) -> None:
    """--group-size shapes int4 weights only; given without them it would change nothing, so
    it is refused rather than ignored. Leaves ``args.group_size`` a plain int."""
    given = not isinstance(args.group_size, DefaultGroupSize)
    args.group_size = int(args.group_size)
    if given and "int4" not in {*formats, args.head_weights}:
        raise QuicksilverError(
            f"--group-size {args.group_size} applies to int4 weights only; add --weights int4 "
            "(or --head-weights int4), or leave --group-size out"
        )


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        NAME,
        parents=[common],
        help="generate text from prompts",
        description="Continue each prompt. One prompt is printed as it is generated; several "
        "run as one batch and print when done. Timing and counted FLOPs go to stderr.",
    )
    add_dtype(parser, "bfloat16")
    parser.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    parser.add_argument("--prompt-file", metavar="FILE", help="one prompt per line, as a batch")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        metavar="N",
        help="tokens to generate per prompt, at most (default: %(default)s)",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)"
    )
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off (default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off (default)")
    parser.add_argument("--seed", type=int, metavar="N", help="seed for reproducible sampling")
    parser.add_argument(
        "--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template"
    )
    add_speculative_args(parser)
    add_policy_args(parser, target_speedup=True)
    mark_group_size_default(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    check_group_size(args, [args.weights])
    require_positive(max_new_tokens=args.max_new_tokens)
    sampling = qs.SamplingConfig(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    check_target_speedup(args.target_speedup)
    check_model_args(args)
    speculative = speculative_setting(args)
    prompts = read_prompts(args)
    policy = load_policy_args(args)
    check_speculative_policy(policy, speculative)
    json_path = check_output(args.json, args)
    set_threads(args.threads)

    llm = load_llm(args)
    token_ids = [llm.encode(p, chat=args.chat) for p in prompts]
    check_cache_fits(
        llm.config,
        llm.model.dtype,
        rows=len(token_ids),
        length=max(map(len, token_ids)) + args.max_new_tokens - 1,
        fix="use shorter or fewer prompts or a lower --max-new-tokens",
    )
    policy = with_target_speedup(policy, args.target_speedup, args.max_new_tokens, llm.config)
    if not policy.is_off:
        say(f"policy: {policy.describe()}")
    prepare_drafting(llm, policy, speculative)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        policy=policy,
        speculative=speculative,
        **dataclasses.asdict(sampling),
    )
    with Meter() as meter:
        if len(token_ids) == 1:
            stream = llm.stream(token_ids[0], **options)
            for piece in stream:
                sys.stdout.write(printable(piece))
                sys.stdout.flush()
            show()
            output = stream.output
        else:
            output = llm.generate(token_ids, **options)
            for i, (prompt, completion) in enumerate(zip(prompts, output.completions, strict=True)):
                show(f"--- [{i}] {prompt}")
                show(completion.text)
    compiled = f", compile {output.compile_seconds:.1f} s" if args.compile else ""
    say(
        f"[{output.new_tokens} tokens, prefill {output.prefill_seconds:.2f} s, "
        f"decode {output.decode_tokens_per_s:.1f} tok/s{compiled}, "
        f"{output.flops_per_token / 1e9:.2f} GFLOP/token, weights {llm.weights.describe()}]"
    )
    if output.speculative is not None:
        drafted = output.speculative
        say(
            f"[speculative {drafted['method']}: {drafted['draft_tokens']} tokens drafted in "
            f"{drafted['drafts']} steps, {drafted['accepted_tokens']} accepted, mean accepted "
            f"length {drafted['mean_accepted_length']:.2f}, {output.decode_steps} decode forwards, "
            f"draft {drafted['draft_flops'] / 1e9:.2f} / verify "
            f"{drafted['verify_flops'] / 1e9:.2f} GFLOP]"
        )
        for note in drafted["plan_notes"]:
            say(f"[{note}]")
        if drafted["calibration_seconds"]:
            say(f"[{drafted['calibration_seconds']:.1f} s spent measuring the drafting plan]")
    if json_path is not None:
        record = {
            "model": args.model,
            "dtype": args.dtype,
            "weights": llm.weights.to_dict(),
            "chat": args.chat,
            "sampling": dataclasses.asdict(sampling),
            "max_new_tokens": args.max_new_tokens,
            "prompts": prompts,
            "load_seconds": llm.load_seconds,
            "peak_rss_bytes": meter.peak_rss_bytes,
        }
        write_json_atomic(json_path, {**record, **output.to_dict()})
    return 0
