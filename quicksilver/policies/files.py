"""Policies as text: presets, JSON/YAML files and ``mechanism.parameter=value`` overrides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from quicksilver.policies.base import PolicyConfigError
from quicksilver.policies.stack import PRESETS, Policy


def load_policy(spec: str | None, overrides: list[str] | None = None) -> Policy:
    """A policy from a preset name or a JSON/YAML file, with ``name.key=value`` overrides
    (values parsed as YAML scalars: numbers, null, true/false, text)."""
    config: dict[str, Any] = {}
    if spec:
        if spec in PRESETS:
            config = json.loads(json.dumps(PRESETS[spec]))
        else:
            config = read_policy_file(Path(spec))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        name, dot, param = key.strip().partition(".")
        if not sep or not dot or not name or not param:
            raise PolicyConfigError(
                f"--set expects mechanism.parameter=value (e.g. halting.min_layer=20), got {item!r}"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise PolicyConfigError(f"cannot parse the value in {item!r}: {exc}") from None
        section = config.get(name) or {}
        config[name] = section
        if not isinstance(section, dict):
            raise PolicyConfigError(f"policy {name!r} in the configuration is not a mapping")
        section[param] = value
    return Policy.from_config(config)


def read_policy_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        presets = ", ".join(PRESETS)
        raise PolicyConfigError(
            f"policy {str(path)!r} is neither a preset ({presets}) nor an existing JSON/YAML file"
        )
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PolicyConfigError(f"cannot parse policy file {path}: {exc}") from None
    if isinstance(data, dict) and "policy" in data and isinstance(data["policy"], dict):
        data = data["policy"]  # a results or calibration JSON: reuse the policy it stored
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PolicyConfigError(
            f"policy file {path} must hold a mapping, got {type(data).__name__}"
        )
    return data


def write_policy_file(stack: Policy, path: Path) -> None:
    text = (
        json.dumps(stack.to_config(), indent=2)
        if path.suffix == ".json"
        else yaml.safe_dump(stack.to_config(), sort_keys=False)
    )
    path.write_text(text + ("\n" if not text.endswith("\n") else ""), encoding="utf-8")
