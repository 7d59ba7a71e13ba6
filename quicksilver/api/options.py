"""``GenerationOptions``: how to continue a prompt, as one object checked once where it is
built and passed through untouched (``LLM.generate``, ``LLM.stream``, ``Batch.submit`` and
the server all take it), so no layer checks or rebuilds it again.

Options say how to generate; the prompt side (texts or token ids, ``chat`` templating) and
the policy are arguments of the call, because they decide what the model reads and how it
runs, not what the sampler does: the server, for one, builds its own chat prompts and
shares one options object between them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, Unpack

from quicksilver.api.arguments import count, flag, integer, stop_strings
from quicksilver.errors import InvalidArgument, QuicksilverError
from quicksilver.runtime.sampling import SamplingConfig
from quicksilver.runtime.speculative import SpeculativeConfig, speculative_config

# Alternatives per generated token a request may ask for (OpenAI's limit).
MAX_LOGPROBS = 20


class OptionKeywords(TypedDict, total=False):
    """The keywords ``GenerationOptions.build`` reads (and so every generation method)."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: str | Sequence[str] | None
    stop_ids: Sequence[int] | None
    ignore_eos: bool
    logprobs: int | None
    speculative: Any
    n: int


SAMPLING_KEYWORDS = ("temperature", "top_k", "top_p", "seed")


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate: checked and normalised on construction, immutable after.

    A row ends at an EOS or one of ``stop_ids`` (kept in its tokens), at a ``stop`` string
    (its text is cut before it) or after ``max_new_tokens``; ``ignore_eos`` turns the EOS
    stop off (``stop_ids`` still apply), as in vLLM. ``sampling`` picks each token
    (greedy by default). ``logprobs`` asks for each token's log-prob and that many
    alternatives (``Batch`` events carry them). ``speculative`` drafts tokens that the full
    model verifies (the same tokens in fewer forwards): None takes the default given to
    ``load`` (or to the batch), False turns drafting off. ``n`` continuations of each prompt,
    drawn from one generator when seeded, so they differ, reproducibly.

    Stop ids are checked against a model's vocabulary when a request is checked: this
    object knows no model.
    """

    max_new_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    speculative: SpeculativeConfig | Literal[False] | None = None
    n: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.sampling, SamplingConfig):
            raise InvalidArgument(
                f"sampling must be a SamplingConfig, got {type(self.sampling).__name__}"
            )
        normalised = {
            "max_new_tokens": count("max_new_tokens", self.max_new_tokens),
            "stop": stop_strings(self.stop),
            "stop_ids": _stop_ids(self.stop_ids),
            "ignore_eos": flag("ignore_eos", self.ignore_eos),
            "logprobs": _logprobs(self.logprobs),
            "speculative": speculative_option(self.speculative),
            "n": count("n", self.n),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @classmethod
    def build(cls, **keywords: Unpack[OptionKeywords]) -> GenerationOptions:
        """Options from the flat keywords of ``OptionKeywords`` (``temperature``, ``top_k``,
        ``top_p`` and ``seed`` make the SamplingConfig). Warns, in the caller's thread, of
        sampling keywords that cannot change the outcome (``SamplingConfig.ignored``)."""
        unknown = sorted(set(keywords) - set(OptionKeywords.__annotations__))
        if unknown:
            raise InvalidArgument(
                f"unknown option {unknown[0]!r}; accepted: "
                f"{', '.join(OptionKeywords.__annotations__)}"
            )
        chosen = {k: v for k, v in keywords.items() if k not in SAMPLING_KEYWORDS}
        try:
            sampling = SamplingConfig(
                **{k: keywords[k] for k in SAMPLING_KEYWORDS if k in keywords}
            )
        except QuicksilverError as err:
            raise InvalidArgument(str(err)) from None
        note = sampling.ignored_note()  # e.g. top_p while greedy
        if note:
            warnings.warn(note, stacklevel=2)
        return cls(sampling=sampling, **chosen)


def options_from(options: Any, keywords: Mapping[str, Any]) -> GenerationOptions:
    """The options of one call: ``options`` as given, or built from ``keywords`` — never
    both, since which would win is a guess."""
    if options is None:
        return GenerationOptions.build(**keywords)
    if not isinstance(options, GenerationOptions):
        raise InvalidArgument(f"options must be a GenerationOptions, got {type(options).__name__}")
    if keywords:
        raise InvalidArgument(
            f"give options or keywords, not both (got options and {', '.join(sorted(keywords))})"
        )
    return options


def _stop_ids(ids: Any) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise InvalidArgument(f"stop_ids must be a list of token ids, got {type(ids).__name__}")
    checked = tuple(integer("stop_ids", token) for token in ids)
    if any(token < 0 for token in checked):
        raise InvalidArgument(f"stop_ids must be token ids (>= 0), got {list(checked)}")
    return checked


def _logprobs(value: Any) -> int | None:
    if value is None:
        return None
    value = integer("logprobs", value)
    if not 0 <= value <= MAX_LOGPROBS:
        raise InvalidArgument(f"logprobs must be in 0..{MAX_LOGPROBS}, got {value}")
    return value


def speculative_option(value: Any) -> SpeculativeConfig | Literal[False] | None:
    """A ``speculative=`` argument: None (the default), False (off) or a checked
    SpeculativeConfig (from a method name or a mapping of its fields)."""
    if value is None or value is False:
        return value
    try:
        return speculative_config(value)
    except QuicksilverError as err:
        raise InvalidArgument(str(err)) from None
