"""Policies as text: presets, JSON/YAML files and ``mechanism.parameter=value`` overrides.

Policy files come from users and from earlier runs, so the reader treats them as untrusted:
whatever the bytes (binary, invalid UTF-8, huge, YAML of any shape), the outcome is a
``Policy`` or a ``PolicyConfigError`` that names the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from quicksilver.outputs import write_text_atomic
from quicksilver.policies.base import PolicyConfigError
from quicksilver.policies.stack import PRESETS, Policy

# A policy is a few hundred bytes and a calibration record with its trials a few kilobytes;
# anything this large is the wrong file, and parsing it would only waste time and memory.
MAX_POLICY_BYTES = 4 * 1024 * 1024

# Layers, windows, vocabulary sizes and token counts are all far below this; larger integers
# can only be mistakes, and would overflow the int64 tensors the mechanisms build from them.
MAX_POLICY_INT = 2**53

# What the YAML/JSON parsers raise on hostile text besides their own error types: bad dates
# and over-long integers (ValueError), unhashable keys (TypeError), deep nesting (RecursionError).
_PARSE_ERRORS = (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError)


def load_policy(
    spec: str | os.PathLike[str] | dict[str, Any] | Policy | None,
    overrides: Sequence[str] | None = None,
) -> Policy:
    """A policy from a preset name, a JSON/YAML file, a configuration mapping or a Policy,
    with ``name.key=value`` overrides (values parsed as YAML scalars: numbers, null,
    true/false, text). None or "" is the dense model; a Policy without overrides is returned
    as is; a mapping is copied, never modified.
    """
    if isinstance(spec, Policy):
        if not overrides:
            return spec
        config = spec.to_config()
    elif isinstance(spec, dict):
        config = {k: dict(v) if isinstance(v, dict) else v for k, v in spec.items()}
    elif spec is None or (isinstance(spec, str) and not spec):
        config = {}
    elif isinstance(spec, str) and spec in PRESETS:
        config = json.loads(json.dumps(PRESETS[spec]))
    elif isinstance(spec, (str, os.PathLike)):
        config = read_policy_file(spec)
    else:
        raise PolicyConfigError(
            "a policy is a preset name, a JSON/YAML file path, a mapping "
            f"{{mechanism: {{parameter: value}}}} or a Policy, got {type(spec).__name__}"
        )
    _apply_overrides(config, overrides)
    return Policy.from_config(check_policy_config(config, "the policy configuration"))


def _apply_overrides(config: dict[str, Any], overrides: Sequence[str] | None) -> None:
    if overrides is None:
        return
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, Sequence):
        hint = " (wrap it in a list)" if isinstance(overrides, str) else ""
        raise PolicyConfigError(
            "overrides must be a list of 'mechanism.parameter=value' strings, got "
            f"{type(overrides).__name__}{hint}"
        )
    for item in overrides:
        if not isinstance(item, str):
            raise PolicyConfigError(
                f"--set expects mechanism.parameter=value text, got {item!r} "
                f"({type(item).__name__})"
            )
        key, sep, raw = item.partition("=")
        name, dot, param = key.strip().partition(".")
        if not sep or not dot or not name or not param:
            raise PolicyConfigError(
                f"--set expects mechanism.parameter=value (e.g. halting.min_layer=20), got {item!r}"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except _PARSE_ERRORS as exc:
            reason = " ".join(str(exc).split())
            raise PolicyConfigError(f"cannot parse the value in {item!r}: {reason}") from None
        section = config.get(name) or {}
        config[name] = section
        if not isinstance(section, dict):
            raise PolicyConfigError(f"policy {name!r} in the configuration is not a mapping")
        section[param] = value


def read_policy_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The configuration mapping stored in a JSON (by its .json suffix) or YAML file, or in
    the ``policy`` entry of a results or calibration JSON."""
    path = Path(path)
    if path.is_dir():
        raise PolicyConfigError(f"policy {str(path)!r} is a directory, not a JSON/YAML file")
    if not path.is_file():
        presets = ", ".join(PRESETS)
        raise PolicyConfigError(
            f"policy {str(path)!r} is neither a preset ({presets}) nor an existing JSON/YAML file"
        )
    try:
        with path.open("rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as err:
        raise PolicyConfigError(
            f"cannot read policy file {path}: {err.strerror or err}; check its permissions"
        ) from err
    return parse_policy_text(data, str(path), json_format=path.suffix.lower() == ".json")


def parse_policy_text(data: bytes, source: str, json_format: bool) -> dict[str, Any]:
    """The configuration mapping in ``data`` (the bytes of a policy file named ``source``)."""
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyConfigError(
            f"policy file {source} is larger than {MAX_POLICY_BYTES // 2**20} MiB; a policy "
            "is a small JSON/YAML mapping: is this the right file?"
        )
    if b"\0" in data:
        raise PolicyConfigError(f"policy file {source} is a binary file, not JSON/YAML text")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark from Windows editors is harmless
    except UnicodeDecodeError as err:
        raise PolicyConfigError(
            f"policy file {source} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
            f"{err.start}); save it as UTF-8"
        ) from None
    try:
        config = json.loads(text) if json_format else yaml.safe_load(text)
    except _PARSE_ERRORS as exc:
        reason = " ".join(f"{exc}".split())[:300] or type(exc).__name__
        raise PolicyConfigError(f"cannot parse policy file {source}: {reason}") from None
    if isinstance(config, dict) and "policy" in config:
        config = config["policy"]  # a results or calibration JSON: reuse the policy it stored
        source = f"the 'policy' entry of {source}"
    return check_policy_config(config, f"policy file {source}")


def check_policy_config(config: Any, source: str) -> dict[str, Any]:
    """``config`` if it has the shape {mechanism name: {parameter name: value} or null}
    (None counts as {}); otherwise a PolicyConfigError that says where and what is wrong.

    Values are left to the mechanisms, which know their parameters' types and ranges, except
    integers too large for any parameter.
    """
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise PolicyConfigError(
            f"{source} must hold a mapping {{mechanism: {{parameter: value}}}}, "
            f"got {type(config).__name__}"
        )
    for name, section in config.items():
        if not isinstance(name, str):
            raise PolicyConfigError(
                f"{source}: mechanism names must be text, got {name!r} ({type(name).__name__})"
            )
        if section is not None and not isinstance(section, dict):
            raise PolicyConfigError(
                f"{source}: {name!r} must map parameter names to values, "
                f"got {type(section).__name__}"
            )
        for param, value in (section or {}).items():
            if not isinstance(param, str):
                raise PolicyConfigError(
                    f"{source}: parameter names of {name!r} must be text, got {param!r} "
                    f"({type(param).__name__})"
                )
            if isinstance(value, int) and abs(value) > MAX_POLICY_INT:
                raise PolicyConfigError(
                    f"{source}: {name}.{param} = {value} is out of range; no policy parameter "
                    "is anywhere near 2**53"
                )
    return config


def write_policy_file(stack: Policy, path: str | os.PathLike[str]) -> None:
    """Write ``stack`` as JSON (a .json path) or YAML (anything else), atomically."""
    path = Path(path)
    config = stack.to_config()
    if path.suffix.lower() == ".json":
        text = json.dumps(config, indent=2) + "\n"
    else:
        text = yaml.safe_dump(config, sort_keys=False)
    write_text_atomic(path, text)
