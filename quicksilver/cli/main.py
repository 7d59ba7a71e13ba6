"""The ``quicksilver`` command: the parser, and the one place where failures become messages.

Each command module adds its subparser (``add_parser``) and a handler (``run(args) -> int``)
that checks its options before any work, then calls the library. Whatever happens in a
handler, the user sees results or one ``error:`` line on stderr, never a traceback. Exit
codes: 0 done; 1 the run finished but failed on its own terms (``calibrate`` missed its
budget; the closest trial is still written); 2 an error (bad options or files, a model that
cannot load or does not fit, or a bug, reported as such); 130 Ctrl-C; 141 the reader of stdout
went away (``quicksilver generate ... | head``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import quicksilver as qs
from quicksilver.cli import adapt, bench, calibrate, eval_gen, generate, models, policies, serve
from quicksilver.cli import eval as eval_command
from quicksilver.cli import lm_eval as lm_eval_command
from quicksilver.cli.console import one_line, print_error, say
from quicksilver.cli.options import Parser, common_options
from quicksilver.errors import QuicksilverError

PROG = "quicksilver"
# In the order `quicksilver --help` lists them.
COMMANDS = (
    generate,
    eval_command,
    calibrate,
    eval_gen,
    policies,
    bench,
    models,
    serve,
    lm_eval_command,
    adapt,
)
BUG_HINT = "this is a bug in quicksilver; please report it with the command you ran"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Run frozen pretrained LLMs with quicksilver's engine and adaptive "
        "per-token policies: generate text, measure perplexity and generation quality, "
        "calibrate a policy to a budget and benchmark throughput against transformers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {qs.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = common_options()
    for command in COMMANDS:
        command.add_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line (default: ``sys.argv[1:]``) and return the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if any("\0" in arg for arg in args_list):  # only possible in-process, never from a shell
        print_error("arguments cannot contain NUL characters")
        return 2
    parser = build_parser()
    try:
        args = parse(parser, args_list)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command is None:
        names = ", ".join(command.NAME for command in COMMANDS)
        print_error(f"give a command ({names}); see `{PROG} --help`")
        return 2
    return run_command(args.handler, args)


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``: unknown options are errors, except for ``lm-eval``, which
    hands what it does not know to lm-evaluation-harness (``lm_eval.parse``). The command is
    the first argument that is not an option (the top-level options take no values)."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command == lm_eval_command.NAME:
        return lm_eval_command.parse(parser, argv)
    return parser.parse_args(argv)


@contextlib.contextmanager
def warnings_as_notes() -> Iterator[None]:
    """Show library warnings (e.g. sampling options that have no effect) as one ``note:`` line
    each, not as Python's two lines naming a source file."""
    original = warnings.showwarning

    def note(message: Warning | str, *args: Any, **kwargs: Any) -> None:
        say(f"note: {one_line(str(message))}")

    warnings.showwarning = note
    try:
        yield
    finally:
        warnings.showwarning = original


def run_command(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``handler(args)``, every failure turned into one line and an exit code."""
    try:
        with warnings_as_notes():
            return handler(args)
    except QuicksilverError as err:
        print_error(str(err))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Nothing more can reach the reader; point stdout at /dev/null so that the
        # interpreter's last flush does not fail a second time.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except MemoryError:
        print_error(
            "out of memory; use fewer or shorter inputs (--max-new-tokens, --batch-size, "
            "--context, --max-chars) or a smaller model"
        )
    except Exception as err:  # a bug: still one line, with what the maintainers need
        detail = one_line(f"{type(err).__name__}: {err}", limit=200)
        print_error(f"unexpected {detail} ({BUG_HINT})")
    return 2
