"""Every command the README and docs/ print is one the code accepts: the program or benchmark
exists, the subcommand exists, and every option given is one its parser knows. Checked at
``--help`` level only, by building the parsers; nothing is run."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from quicksilver.cli import lm_eval as lm_eval_command
from quicksilver.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BENCHMARKS = ROOT / "benchmarks"

# How a printed command starts, and what runs it: the CLI or a benchmark script.
CLI_PREFIXES = (
    ("quicksilver",),
    (".venv/bin/quicksilver",),
    ("python", "-m", "quicksilver"),
    (".venv/bin/python", "-m", "quicksilver"),
)
SCRIPT_RUNNERS = ("python", ".venv/bin/python")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`([^`]+)`")
OPTION = re.compile(r"^--?[A-Za-z][\w-]*")


@dataclass(frozen=True)
class Command:
    where: str  # page:line
    words: tuple[str, ...]


def _starts_a_command(text: str) -> bool:
    words = text.split()
    if not words:
        return False
    if any(tuple(words[: len(prefix)]) == prefix for prefix in CLI_PREFIXES):
        return True
    return len(words) > 1 and words[0] in SCRIPT_RUNNERS and words[1].startswith("benchmarks/")


def _words(text: str) -> tuple[str, ...]:
    """The command's words as a shell would split them, up to a pipe or a comment; usage
    brackets (``[--repair]``) stand for the option inside them."""
    words = []
    for word in shlex.split(text, comments=True):
        if word in ("|", "||", "&&", ";", ">", ">>"):
            break
        words.append(word.removeprefix("[").removesuffix("]"))
    return tuple(words)


def commands_in(text: str, page: str) -> Iterator[Command]:
    """Commands on a Markdown page: lines of fenced blocks (a leading ``$ `` dropped,
    backslash continuations joined) and inline code spans that start like a command."""
    in_fence = False
    lines = text.splitlines()
    number = 0
    while number < len(lines):
        line, start = lines[number], number + 1
        number += 1
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            command = line.strip().removeprefix("$ ")
            while command.endswith("\\") and number < len(lines):
                command = command[:-1] + " " + lines[number].strip()
                number += 1
            if _starts_a_command(command):
                yield Command(f"{page}:{start}", _words(command))
            continue
        for span in INLINE_CODE.findall(line):
            if _starts_a_command(span):
                yield Command(f"{page}:{start}", _words(span))


def documented_commands() -> list[Command]:
    return [
        command
        for page in PAGES
        for command in commands_in(page.read_text(encoding="utf-8"), str(page.relative_to(ROOT)))
    ]


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return set(parser._option_string_actions)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@cache
def benchmark_parser(script: str) -> argparse.ArgumentParser:
    """The benchmark's own parser (its ``build_parser``), imported but not run; its folder is
    on the path while it imports, as when it runs, for the helpers it shares."""
    path = BENCHMARKS / script
    spec = importlib.util.spec_from_file_location(f"benchmarks_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it imports
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module.build_parser()


@cache
def harness_options() -> set[str] | None:
    """The options lm-evaluation-harness's ``run`` takes, or None without the harness (its
    options are then left to it)."""
    try:
        from lm_eval._cli import HarnessCLI
    except ImportError:
        return None
    return _options(_subcommands(HarnessCLI()._parser)["run"])


def _given_options(words: tuple[str, ...]) -> list[str]:
    """The options among ``words`` (``--flag=value`` counts as ``--flag``), up to a ``--``
    that ends them; negative numbers are values."""
    found = []
    for word in words:
        if word == "--":
            break
        match = OPTION.match(word)
        if match:
            found.append(match.group(0))
    return found


def _unknown(
    shown: str, parser: argparse.ArgumentParser, words: tuple[str, ...], extra: set[str]
) -> list[str]:
    accepted = _options(parser) | extra
    return [f"`{shown}` has no option {o}" for o in _given_options(words) if o not in accepted]


def _cli_problems(words: tuple[str, ...]) -> list[str]:
    """``words`` after ``quicksilver``: the command exists and takes every option given (for
    lm-eval, its own or the harness's)."""
    parser = build_parser()
    name = next((w for w in words if not w.startswith("-")), None)
    if name is None:
        return _unknown("quicksilver", parser, words, set())
    commands = _subcommands(parser)
    if name not in commands:
        return [f"no command `quicksilver {name}`"]
    at = words.index(name)
    problems = _unknown("quicksilver", parser, words[:at], set())
    extra: set[str] = set()
    if name == lm_eval_command.NAME:
        harness = harness_options()
        if harness is None:
            return problems  # the rest is the harness's to judge
        extra = harness
    command, shown, rest = commands[name], f"quicksilver {name}", words[at + 1 :]
    kinds = _subcommands(command)  # a command of commands (``adapt skipdecode``)
    kind = next((w for w in rest if not w.startswith("-")), None)
    if kinds and kind is not None:  # (a mention of the bare command is fine)
        if kind not in kinds:
            return problems + [f"no command `{shown} {kind}`"]
        shown, command, rest = f"{shown} {kind}", kinds[kind], rest[rest.index(kind) + 1 :]
    return problems + _unknown(shown, command, rest, extra)


def problems_with(command: Command) -> list[str]:
    """What is wrong with one documented command: an unknown program, subcommand or option."""
    words = command.words
    prefix = next((p for p in CLI_PREFIXES if words[: len(p)] == p), None)
    if prefix is not None:
        return _cli_problems(words[len(prefix) :])
    script = words[1].removeprefix("benchmarks/")
    if not (BENCHMARKS / script).is_file():
        return [f"no benchmark {words[1]}"]
    return _unknown(words[1], benchmark_parser(script), words[2:], set())


def test_the_docs_print_commands() -> None:
    """Guard against an extraction that silently finds nothing."""
    found = documented_commands()
    assert len(found) > 50
    assert any(c.words[1:2] == ("benchmarks/serve_load.py",) for c in found)
    assert any(c.words[:2] == (".venv/bin/quicksilver", "lm-eval") for c in found)


def test_every_documented_command_is_accepted() -> None:
    wrong = [
        f"{command.where}: {problem}"
        for command in documented_commands()
        for problem in problems_with(command)
    ]
    assert wrong == [], "\n".join(wrong)


@pytest.mark.parametrize(
    ("page", "problem"),
    [
        ("```bash\nquicksilver generate --no-such-flag 3\n```", "has no option --no-such-flag"),
        ("Run `quicksilver frobnicate --model x`.", "no command `quicksilver frobnicate`"),
        (
            "```\n$ python benchmarks/serve_load.py --clients 4 \\\n    --max-tokens 24\n```",
            "has no option --max-tokens",
        ),
        ("`python benchmarks/nowhere.py --fast`", "no benchmark benchmarks/nowhere.py"),
        ("```sh\npython -m quicksilver eval --windw 4  # typo\n```", "has no option --windw"),
        ("`quicksilver adapt halting --steps 3`", "no command `quicksilver adapt halting`"),
        ("`quicksilver adapt exits --rank 4`", "`quicksilver adapt exits` has no option --rank"),
    ],
)
def test_a_wrong_command_is_caught(page: str, problem: str) -> None:
    (command,) = commands_in(page, "page.md")
    assert any(problem in found for found in problems_with(command)), problems_with(command)


def test_right_commands_pass() -> None:
    page = (
        "```bash\n.venv/bin/quicksilver eval --policy paper --max-windows 8   # comment\n"
        "python benchmarks/engine.py --threads 2 --repeats 2\n"
        "quicksilver generate --prompt 'a | b' --max-new-tokens=4 | head\n```\n"
        "Also `quicksilver models --verify [--repair]`, not `import quicksilver as qs`.\n"
        "| quicksilver int8 | 91.1 |\n"
    )
    found = list(commands_in(page, "page.md"))
    assert len(found) == 4
    assert [problems_with(command) for command in found] == [[], [], [], []]


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_benchmarks_default_to_the_threads_their_pages_were_measured_with(script: str) -> None:
    """The pages under docs/ were measured with 2 threads; a rerun without --threads must
    not silently use every core of a bigger machine."""
    if "build_parser" not in (BENCHMARKS / script).read_text(encoding="utf-8"):
        pytest.skip("not a benchmark with a command line")
    threads = benchmark_parser(script)._option_string_actions.get("--threads")
    if threads is not None:
        assert threads.default == 2
