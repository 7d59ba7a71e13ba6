"""What a command reads besides the model: prompts, evaluation text and the policy, each
turned from options into library objects with errors that name the option."""

from __future__ import annotations

import argparse
from pathlib import Path

import quicksilver as qs
from quicksilver.api import LLM, weight_format
from quicksilver.api.arguments import check_drafting
from quicksilver.cli.checks import utf8
from quicksilver.cli.console import say
from quicksilver.errors import QuicksilverError
from quicksilver.eval import datasets
from quicksilver.eval.datasets import EvalText
from quicksilver.eval.generation import wikitext_prompts
from quicksilver.models.config import ModelConfig
from quicksilver.models.loading import parse_dtype
from quicksilver.policies import Policy, load_policy
from quicksilver.policies.skipdecode import schedule_for_speedup
from quicksilver.runtime.speculative.settings import speculative_config
from quicksilver.text import encode_stream


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values, then the non-blank lines of --prompt-file."""
    prompts = [utf8(p, "--prompt") for p in args.prompt or []]
    if args.prompt_file:
        path = Path(args.prompt_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise QuicksilverError(f"cannot read prompt file {path}: {err}") from err
        from_file = [line for line in lines if line.strip()]
        if not from_file:
            raise QuicksilverError(f"prompt file {path} has no non-empty lines")
        prompts.extend(from_file)
    if not prompts:
        raise QuicksilverError("give a prompt with --prompt TEXT or --prompt-file FILE")
    if any(not p for p in prompts):
        raise QuicksilverError("prompts must not be empty")
    return prompts


def load_eval_text(args: argparse.Namespace) -> EvalText:
    """--text-file, --jsonl (its --field, default ``text``) or --dataset (default WikiText-2,
    its test split unless it has none)."""
    if args.text_file:
        return datasets.load_text_file(args.text_file, max_chars=args.max_chars)
    if args.jsonl:
        return datasets.load_jsonl(args.jsonl, args.field or "text", max_chars=args.max_chars)
    name = args.dataset or "wikitext-2"
    split = args.split
    if split is None and name in datasets.DATASETS:  # an unknown name is the loader's error
        splits = datasets.DATASETS[name].local
        split = "test" if "test" in splits else next(iter(splits))
    return datasets.load_eval_text(
        name,
        split or "test",
        data_dir=Path(args.data_dir) if args.data_dir else None,
        max_chars=args.max_chars,
    )


def generation_prompts(args: argparse.Namespace) -> tuple[list[str], str]:
    """Up to ``--prompts`` prompts and where they came from: the --field (default ``prompt``)
    of each line of --jsonl, else the first sentence of each paragraph of the chosen text."""
    if args.jsonl:
        if args.max_chars is not None:
            raise QuicksilverError("--max-chars applies to text, not to prompts from --jsonl")
        documents = datasets.read_jsonl_documents(args.jsonl, args.field or "prompt")
        prompts, name = [d.strip() for d in documents if d.strip()][: args.prompts], args.jsonl
    else:
        text = load_eval_text(args)
        prompts, name = wikitext_prompts(text.text, args.prompts), text.name
    if not prompts:
        raise QuicksilverError(f"no prompts found in {name}; check --jsonl and --field")
    # JSON escapes can spell lone surrogates, which no tokenizer takes.
    return [utf8(p, f"a prompt in {name}") for p in prompts], name


def stream_ids(llm: LLM, text: str) -> list[int]:
    """``text`` as one raw token stream, the encoding perplexity scores."""
    if llm.tokenizer is None:
        raise QuicksilverError(f"{llm.name} ships no tokenizer; it cannot score text")
    return encode_stream(llm.tokenizer, text)


def check_model_args(args: argparse.Namespace) -> None:
    """--dtype, --weights, --head-weights and --group-size, before anything is loaded."""
    weight_format(parse_dtype(args.dtype), args.weights, args.head_weights, int4_group_size(args))


def int4_group_size(args: argparse.Namespace, weights: str | None = None) -> int | None:
    """--group-size for a load whose blocks are ``weights`` (default --weights): given to the
    API only when some weights are int4 (``check_group_size`` refused it otherwise)."""
    formats = (weights if weights is not None else args.weights, args.head_weights)
    return args.group_size if "int4" in formats else None


def load_llm(args: argparse.Namespace) -> LLM:
    """The model of --model in --dtype, its weights as --weights/--head-weights say; a note
    on stderr when quantising rounded a GGUF file's blocks a second time."""
    llm = qs.load(
        args.model,
        dtype=args.dtype,
        weights=args.weights,
        head_weights=args.head_weights,
        group_size=int4_group_size(args),
        compile=args.compile,
        adapter=args.adapter,
    )
    if llm.requantised is not None:
        say(f"note: {llm.requantised.message()}")
    return llm


def load_policy_args(args: argparse.Namespace) -> Policy:
    """The policy of --policy (preset or file) and --set overrides."""
    return load_policy(args.policy, args.set)


def with_target_speedup(
    policy: Policy, target: float | None, max_new_tokens: int, config: ModelConfig
) -> Policy:
    """``policy`` with its SkipDecode schedule replaced by the one --target-speedup asks for
    over ``max_new_tokens`` (unchanged without the option); needs the model's shape."""
    if target is None:
        return policy
    return policy.replacing(schedule_for_speedup(config, target, max_new_tokens))


def speculative_setting(args: argparse.Namespace) -> dict | None:
    """--speculative / --speculative-tokens as the API's ``speculative=`` value (checked by
    it), or a one-line error for tokens without a method."""
    if args.speculative is None:
        if args.speculative_tokens is not None:
            raise QuicksilverError("--speculative-tokens needs --speculative METHOD (e.g. ngram)")
        return None
    setting = {"method": args.speculative}
    if args.speculative_tokens is not None:
        setting["num_tokens"] = args.speculative_tokens
    speculative_config(setting)  # refused here, before the model loads
    return setting


def check_speculative_policy(policy: Policy, setting: dict | None) -> None:
    """Refuse --speculative with a policy it cannot run under (fusion; 'planes' without
    Matryoshka width 8 alone) before the model loads, not after the first token is printed.
    """
    check_drafting(policy, speculative_config(setting))


def prepare_drafting(llm: LLM, policy: Policy, setting: dict | None) -> None:
    """Measure (or read from the cache) the drafting plan a model drafter or ``auto`` follows,
    before the first token, saying so: measured between steps instead, a short run would
    decode mostly without drafts while the plan was still being measured."""
    if setting is None or setting["method"] == "ngram":
        return
    plan = llm.draft_plan(policy=None if policy.is_off else policy, progress=say)
    say(f"drafting plan ready (measured in {plan.seconds:.1f} s once, then cached)")
