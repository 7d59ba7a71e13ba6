"""The request's ``quicksilver`` object: which policy a request runs under.

Presets and mappings only: files are the server operator's choice (``--policy``), never a
client's, since a path in a request would let it probe the server's disk.
"""

from __future__ import annotations

from typing import Any

import quicksilver as qs
from quicksilver.errors import QuicksilverError
from quicksilver.policies import PRESETS
from quicksilver.serve.errors import APIError


def parse_policy(value: Any, llm: qs.LLM) -> qs.Policy | None:
    """The request's ``quicksilver`` object: ``{"policy": preset or mapping, "set": [...]}``
    or a preset name. Files are the server operator's choice (``--policy``), never a
    client's: a path in a request would let it probe the server's disk."""
    if value is None:
        return None
    if isinstance(value, str):
        value = {"policy": value}
    if not isinstance(value, dict) or set(value) - {"policy", "set", "speculative"}:
        raise APIError(
            'quicksilver must be a preset name or {"policy": preset or mapping, "set": [...], '
            '"speculative": method or mapping}',
            param="quicksilver",
        )
    spec, overrides = value.get("policy"), value.get("set")
    if spec is None and overrides is None:  # only drafting asked for: the server's policy
        return None
    if isinstance(spec, str) and spec not in PRESETS:
        raise APIError(
            f"unknown policy preset {spec!r}; give one of {', '.join(PRESETS)} or a mapping "
            "{mechanism: {parameter: value}}",
            param="quicksilver.policy",
        )
    if spec is not None and not isinstance(spec, (str, dict)):
        raise APIError("quicksilver.policy must be a preset name or a mapping", param="quicksilver")
    if overrides is not None and (
        not isinstance(overrides, list) or not all(isinstance(s, str) for s in overrides)
    ):
        raise APIError("quicksilver.set must be a list of 'm.p=v' strings", param="quicksilver")
    try:
        policy = qs.load_policy(spec, overrides)
        policy.check_model(llm.config)
    except QuicksilverError as err:
        raise APIError(f"invalid policy: {err}", param="quicksilver") from None
    return policy
