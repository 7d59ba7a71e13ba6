"""quicksilver as an lm-evaluation-harness model: ``--model quicksilver``.

Importing this module registers the ``quicksilver`` model with the harness (the harness has
no plugin entry point, so ``quicksilver lm-eval`` imports it before handing over to the
harness's own command line). ``model_args`` is the harness's comma-separated string, so a
policy travels as a preset name or a file path, with overrides joined by ``;``:

    quicksilver lm-eval --model quicksilver \\
        --model_args pretrained=smollm2-135m,policy=paper,set=kv_skip.treatment=skip \\
        --tasks qs_wikitext2_doc

Requests are scored the way the harness's own Hugging Face model scores them (its
tokenisation, prefix token and document-level rolling windows), so a dense run reproduces
the harness's ``hf`` numbers for the same model, and a policy's effect is the difference.
"""

from __future__ import annotations

import difflib
import inspect
import os
import warnings
from collections import defaultdict
from typing import Any

import lm_eval.models  # noqa: F401  (the harness's own models: see below)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string
from tqdm import tqdm

import quicksilver as qs
from quicksilver.errors import QuicksilverError
from quicksilver.text import encode_stream

# The harness fills its model registry with its own models only while the registry is
# empty, so they are imported above, before ``quicksilver`` is added; otherwise registering
# ours would hide ``hf``, ``local-completions`` and the rest.


def _policy_from_args(policy: Any, overrides: Any) -> qs.Policy:
    """``policy=`` (a preset or a file) and ``set=a.b=1;c.d=2`` as ``--policy`` and ``--set``."""
    items = [s.strip() for s in str(overrides).split(";") if s.strip()] if overrides else None
    return qs.load_policy(None if policy in (None, "") else str(policy), items)


def _positive(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise QuicksilverError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1 or str(number) != str(value).strip():
        raise QuicksilverError(f"{name} must be a positive integer, got {value!r}")
    return number


def _refuse_unknown(given: dict[str, Any], accepted: list[str]) -> None:
    """A misspelt key (``polcy=paper``) must not run the dense model as if nothing was asked:
    name what was not understood and what is."""
    if not given:
        return
    hints = []
    for key in sorted(given):
        close = difflib.get_close_matches(key, accepted, n=1)
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    raise QuicksilverError(
        f"unknown model_args {', '.join(hints)} for --model quicksilver; accepted: "
        f"{', '.join(accepted)}"
    )


@register_model("quicksilver")
class QuicksilverLM(LM):
    """An lm-evaluation-harness ``LM`` backed by ``qs.load(pretrained)`` under a policy."""

    def __init__(
        self,
        pretrained: str = qs.DEFAULT_MODEL,
        policy: str | None = None,
        set: str | None = None,  # noqa: A002 (the harness passes model_args by name)
        dtype: str = "bfloat16",
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        device: str | None = None,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        # ``device`` and ``max_batch_size`` come from the harness's own options (--device,
        # --max_batch_size); batches here have a fixed size, so the latter changes nothing.
        _refuse_unknown(unknown, self.model_args())
        super().__init__()
        if device not in (None, "cpu"):  # the harness's command line defaults to cuda:0
            warnings.warn(f"device {device!r} ignored: quicksilver runs on the CPU", stacklevel=2)
        self.batch_size = (
            8 if str(batch_size).startswith("auto") else _positive("batch_size", batch_size)
        )
        self.max_gen_toks = _positive("max_gen_toks", max_gen_toks)
        self.policy = _policy_from_args(policy, set)
        self.llm = qs.load(os.fspath(pretrained), dtype=dtype)
        self.policy.check_model(self.llm.config)
        positions = self.llm.config.max_position_embeddings
        self.max_length = positions if max_length is None else _positive("max_length", max_length)
        if self.max_length > positions:
            raise QuicksilverError(
                f"max_length {self.max_length} is more than the model's {positions} positions"
            )
        if self.llm.tokenizer is None:
            raise QuicksilverError("lm-eval needs a model that ships a tokenizer")

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> QuicksilverLM:
        """``--model_args`` as the harness parses it, then ``create_from_arg_obj``."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> QuicksilverLM:
        """The harness adds its own --batch_size (always: it defaults to 1), --max_batch_size
        and --device to ``model_args``; a key given both ways would reach the constructor
        twice (a TypeError), so it is refused, saying which option to use."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        twice = sorted(set(arg_dict) & set(extra))
        if twice:
            options = ", ".join(f"--{key}" for key in twice)
            always = " (it passes --batch_size even when not given: 1)" * ("batch_size" in twice)
            raise QuicksilverError(
                f"{', '.join(twice)} in model_args would also come from the harness's "
                f"{options}{always}; set {'it' if len(twice) == 1 else 'them'} with {options} "
                "only"
            )
        return cls(**arg_dict, **extra)

    @classmethod
    def model_args(cls) -> list[str]:
        """The ``model_args`` keys this backend takes (its constructor's parameters)."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD][1:]

    # ------------------------------------------------------------ what the harness reads

    @property
    def tokenizer_name(self) -> str:
        return self.llm.name

    @property
    def prefix_token_id(self) -> int:
        """What stands before a document (or an empty context): BOS, else EOS, as the
        harness's ``hf`` model does."""
        return self.llm.prefix_token_id

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt=True):
        return self.llm.tokenizer.apply_chat_template(
            chat_history, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def _prompt(self, context: str) -> list[int]:
        return self.llm.encode(context) if context else [self.prefix_token_id]

    # ------------------------------------------------------------ the three requests

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple]:
        pairs = [tuple(request.args) for request in requests]
        results = []
        with self.llm.use(self.policy):
            for start in tqdm(range(0, len(pairs), 64), disable=disable_tqdm):
                chunk = pairs[start : start + 64]
                scored = self.llm.loglikelihoods(chunk, batch_size=self.batch_size)
                for pair, result in zip(chunk, scored, strict=True):
                    answer = (result.logprob, result.is_greedy)
                    self.cache_hook.add_partial("loglikelihood", pair, answer)
                    results.append(answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        tokenizer = self.llm.tokenizer
        results = []
        with self.llm.use(self.policy):
            for request in tqdm(requests, disable=disable_tqdm):
                (text,) = request.args
                ids = encode_stream(tokenizer, text)
                total = (
                    self.llm.rolling_loglikelihood(
                        ids, max_length=self.max_length, batch_size=self.batch_size
                    )
                    if ids
                    else 0.0
                )
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
                results.append(total)
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) continuations, batched per setting."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[repr(sorted(request.args[1].items()))].append(i)
        results: list[str] = [""] * len(requests)
        with self.llm.use(self.policy):
            for indices in tqdm(groups.values(), disable=disable_tqdm):
                kwargs = dict(requests[indices[0]].args[1])
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                new = _positive("max_gen_toks", kwargs.pop("max_gen_toks", self.max_gen_toks))
                sample = bool(kwargs.pop("do_sample", False))
                temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
                keep = max(1, self.max_length - new)
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    prompts = [self._prompt(requests[i].args[0])[-keep:] for i in chunk]
                    out = self.llm.generate(
                        prompts, max_new_tokens=new, temperature=temperature, stop=until or None
                    )
                    for i, completion in zip(chunk, out.completions, strict=True):
                        results[i] = completion.text
                        self.cache_hook.add_partial(
                            "generate_until", requests[i].args, completion.text
                        )
        return results
