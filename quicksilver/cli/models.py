"""``quicksilver models``: the short model names, and whether each is installed."""

from __future__ import annotations

import argparse

from quicksilver.cli.console import show
from quicksilver.errors import QuicksilverError
from quicksilver.eval.report import format_table
from quicksilver.models import loading

NAME = "models"


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(NAME, help="list known model names and whether installed")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    rows = []
    for name, alias in loading.MODEL_ALIASES.items():
        try:
            where, installed = loading.resolve(name).path, "yes"
        except QuicksilverError:
            where, installed = f"run `{alias.install_hint}`", "no"
        label = name + (" (default)" if name == loading.DEFAULT_MODEL else "")
        rows.append([label, installed, where])
    show(format_table(["model", "installed", "path / how to install"], rows))
    show("Any local Hugging Face model directory, .gguf file or hub id also works as --model.")
    return 0
