"""Policies as text: presets, JSON/YAML files and ``mechanism.parameter=value`` overrides.

Policy files come from users and from earlier runs, so the reader treats them as untrusted:
whatever the bytes (binary, invalid UTF-8, huge, YAML of any shape), the outcome is a
``Policy`` or a ``PolicyConfigError`` that names the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from quicksilver.outputs import write_text_atomic
from quicksilver.policies.base import PolicyConfigError
from quicksilver.policies.stack import PRESETS, REGISTRY, Policy

# A policy is a few hundred bytes and a calibration record with its trials a few kilobytes;
# anything this large is the wrong file, and parsing it would only waste time and memory.
MAX_POLICY_BYTES = 4 * 1024 * 1024

# Layers, windows, vocabulary sizes and token counts are all far below this; larger integers
# can only be mistakes, and would overflow the int64 tensors the mechanisms build from them.
MAX_POLICY_INT = 2**53

# Limits checked on the text before a parser builds anything from it. A policy nests three
# levels ({mechanism: {parameter: value}}) and a results JSON a few more; a YAML alias repeats
# a whole subtree, so a kilobyte of nested aliases ("billion laughs") expands to gigabytes
# once anything walks it. A handful of aliases in a file is all a person or a YAML dumper
# writes; a --set value is one scalar and needs none.
MAX_NESTING = 32
MAX_FILE_ALIASES = 16
MAX_SET_VALUE_CHARS = 1024

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")

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
    config = check_policy_config(config, "the policy configuration")
    _refuse_unset_mechanisms(config)
    return Policy.from_config(config)


def _refuse_unset_mechanisms(config: dict[str, Any]) -> None:
    """Refuse a mechanism named with no settings (``halting: {}`` or a bare ``halting:``) whose
    defaults do nothing: the user asked for the mechanism, and quietly running the dense model
    instead would report a policy that never acted. ``kv_skip: {}`` is kept: it is a modifier
    whose default treatment ("propagate") is documented as what halted tokens get anyway."""
    for name, section in config.items():
        cls = REGISTRY.get(name)
        if section or cls is None:  # unknown names are reported by Policy.from_config
            continue
        default = cls()
        if default.is_off and default.kv_treatment is None:
            settings = ", ".join(param for param, _, _ in cls.parameters())
            raise PolicyConfigError(
                f"policy {name!r} is named with no settings, so it would do nothing (the dense "
                f"model); give it at least one setting, from: {settings} (see `quicksilver "
                "policies`)"
            )


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
                "--set expects mechanism.parameter=value (e.g. halting.min_layer=20), got "
                f"{item[:80]!r}"
            )
        if len(raw) > MAX_SET_VALUE_CHARS:
            raise PolicyConfigError(
                f"the value of --set {key.strip()} has {len(raw)} characters; a parameter value "
                f"is a number, a word or null, at most {MAX_SET_VALUE_CHARS} characters"
            )
        try:
            value = safe_yaml(raw, max_aliases=0) if raw.strip() else None
        except _PARSE_ERRORS as exc:
            reason = " ".join(str(exc).split())
            shown = item if len(item) <= 80 else item[:77] + "..."
            raise PolicyConfigError(f"cannot parse the value in {shown!r}: {reason}") from None
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
        if json_format:
            check_json_nesting(data, MAX_NESTING)
            config = json.loads(text)
        else:
            config = safe_yaml(text, MAX_FILE_ALIASES)
    except _PARSE_ERRORS as exc:
        reason = " ".join(f"{exc}".split())[:300] or type(exc).__name__
        raise PolicyConfigError(f"cannot parse policy file {source}: {reason}") from None
    if isinstance(config, dict) and "policy" in config:
        config = config["policy"]  # a results or calibration JSON: reuse the policy it stored
        source = f"the 'policy' entry of {source}"
    return check_policy_config(config, f"policy file {source}")


def safe_yaml(text: str, max_aliases: int) -> Any:
    """``yaml.safe_load(text)``, once the event stream (which the parser produces without
    building anything) shows at most ``max_aliases`` aliases and nesting within
    ``MAX_NESTING``: the limits hold before a single node exists, so a hostile text costs a
    pass over its own bytes, never the expansion it describes. A text over a limit raises
    ``yaml.YAMLError`` saying which, as unparsable YAML does."""
    aliases = depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > max_aliases:
                allowed = f"more than {max_aliases} YAML aliases" if max_aliases else "YAML aliases"
                raise yaml.YAMLError(
                    f"it uses {allowed} (*name), which are refused here; write the values out"
                )
        elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_NESTING:
                raise yaml.YAMLError(
                    f"it nests deeper than {MAX_NESTING} levels; a policy is "
                    "{mechanism: {parameter: value}}"
                )
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    return yaml.safe_load(text)


def check_json_nesting(data: bytes, limit: int) -> None:
    """Refuse JSON ``data`` that nests deeper than ``limit`` arrays/objects, without parsing
    it: brackets are counted outside strings, a loop over the bracket bytes alone that stops
    as soon as the limit is passed. (``json.loads`` recurses once per level, so a deep text
    would otherwise cost a full parse before failing, or a crash in a thread.) Raises
    ValueError, as ``json.loads`` does for text it cannot parse."""
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    depth = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        if depth > limit:
            raise ValueError(f"it nests deeper than {limit} levels of arrays and objects")


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
