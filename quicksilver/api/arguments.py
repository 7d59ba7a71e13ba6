"""Argument checks shared by every API entry point: each mistake is an ``InvalidArgument``
whose message says what to change, raised before any work starts."""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

from quicksilver.errors import InvalidArgument
from quicksilver.policies import Policy
from quicksilver.runtime.speculative.settings import SpeculativeConfig, speculative_policy_error

# What ``use`` and every ``policy=`` argument accept (see ``load_policy``).
PolicySpec = Policy | str | os.PathLike[str] | Mapping[str, Any] | None
# One prompt: text, or token ids.
Prompt = str | Sequence[int]


def integer(name: str, value: Any) -> int:
    """``value`` as an int; a bool, a float or text is a mistake, not a count."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgument(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def count(name: str, value: Any) -> int:
    value = integer(name, value)
    if value < 1:
        raise InvalidArgument(f"{name} must be at least 1, got {value}")
    return value


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be True or False, got {value!r}")
    return value


def stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, Sequence) or not all(isinstance(s, str) for s in stops):
        raise InvalidArgument(f"stop must be a string or a list of strings, got {stop!r}")
    if not all(stops):
        raise InvalidArgument("stop strings must not be empty")
    return tuple(stops)


def token_ids(ids: Any, what: str, vocab: int, allow_empty: bool = False) -> list[int]:
    """``ids`` as a list of ints that index a vocabulary of ``vocab`` tokens."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise InvalidArgument(f"{what} must be a list of token ids, got {type(ids).__name__}")
    if not ids and not allow_empty:
        raise InvalidArgument(f"{what} has no tokens")
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise InvalidArgument(
                f"{what} must hold integer token ids, got {token!r} ({type(token).__name__})"
            )
        if not 0 <= token < vocab:
            raise InvalidArgument(
                f"{what} holds token id {token}, outside the model's vocabulary 0..{vocab - 1}"
            )
    return [int(token) for token in ids]


def prompt_items(prompts: Any) -> list[Any]:
    """One text, one id list, or a list of either, as a list of prompts (unchecked)."""
    if isinstance(prompts, str):
        items = [prompts]
    elif isinstance(prompts, Sequence) and not isinstance(prompts, (bytes, bytearray)):
        nested = any(isinstance(p, (str, Sequence)) for p in prompts)
        items = list(prompts) if nested or not prompts else [prompts]
    else:
        raise InvalidArgument(
            "prompts must be a text, a list of token ids, or a list of either, got "
            f"{type(prompts).__name__}"
        )
    if not items:
        raise InvalidArgument("no prompts given")
    return items


def check_drafting(policy: Policy | None, speculative: SpeculativeConfig | None) -> None:
    """Refuse drafting that cannot run under the policy it would run with (fusion with any
    drafter, 'planes' without Matryoshka width-8 alone), when the request is checked: found
    at the first decode step, the refusal would come after the first token was streamed."""
    error = speculative_policy_error(policy, speculative)
    if error is not None:
        raise InvalidArgument(error)
