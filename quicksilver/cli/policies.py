"""``quicksilver policies``: the adaptive mechanisms, their parameters and the presets."""

from __future__ import annotations

import argparse
import json

from quicksilver.cli.console import show
from quicksilver.policies import PRESETS, REGISTRY

NAME = "policies"


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(NAME, help="list the adaptive mechanisms and their parameters")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    for name, cls in REGISTRY.items():
        show(f"{name}: {cls.summary}")
        for param, kind, default in cls.parameters():
            show(f"    {param:16s} {kind:24s} default {json.dumps(default)}")
    show("presets (--policy NAME):")
    for name, config in PRESETS.items():
        show(f"    {name:10s} {json.dumps(config)}")
    show(
        "A policy is a JSON/YAML mapping {mechanism: {parameter: value}}; pass it with "
        "--policy FILE and adjust with --set mechanism.parameter=value."
    )
    return 0
