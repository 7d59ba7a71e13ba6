"""``quicksilver lm-eval``: lm-evaluation-harness with the ``quicksilver`` model registered and
the offline ``qs_*`` tasks on its include path (the ``lm-eval`` extra).

The harness has no plugin entry point, so this command imports the backend (which registers
``--model quicksilver``), writes the offline tasks with their data paths filled in, and runs
the harness's own command line with every argument this command does not take itself passed
through unchanged, in order (``parse``); after a ``--``, every argument goes to the harness:

    quicksilver lm-eval --model quicksilver --model_args pretrained=smollm2-135m,policy=paper \\
        --tasks qs_wikitext2_doc,qs_facts_mc
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence

from quicksilver.errors import QuicksilverError

NAME = "lm-eval"
OFFLINE_TASKS = ("qs_facts_mc", "qs_wikitext2_doc")
# How the harness says that task names matched nothing (a ValueError, like its other errors).
MISSING_TASKS = "Tasks not found:"


def missing_tasks(err: ValueError) -> str | None:
    """The task names the harness could not find, if ``err`` is its "not found" error."""
    text = str(err)
    return text[len(MISSING_TASKS) :].strip() if text.startswith(MISSING_TASKS) else None


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        NAME,
        help="run lm-evaluation-harness with --model quicksilver and the offline qs_* tasks",
        usage="quicksilver lm-eval [--wikitext-raw FILE] [--wikitext-documents N] [--] "
        "HARNESS_ARGUMENTS ...",
        description="Every argument other than the two below goes to lm-evaluation-harness "
        "unchanged and in order (see `quicksilver lm-eval -- --help`), e.g. `quicksilver "
        "lm-eval --model quicksilver --model_args pretrained=smollm2-135m --tasks "
        "qs_facts_mc`; after `--`, every argument does. Offline tasks: qs_facts_mc (multiple "
        "choice) and qs_wikitext2_doc (WikiText-2 test, document-level rolling "
        "log-likelihood; `quicksilver eval --windows documents` scores the same windows). "
        "`quicksilver lm-eval ls tasks` lists every task.",
        allow_abbrev=False,  # a harness option must never pass for an abbreviation of ours
    )
    parser.add_argument(
        "--wikitext-raw",
        metavar="FILE",
        help="wiki.test.raw for qs_wikitext2_doc (default: the shared data directory)",
    )
    parser.add_argument(
        "--wikitext-documents",
        type=int,
        metavar="N",
        help="score only the first N WikiText articles (default: all 62)",
    )
    parser.set_defaults(handler=run, harness_args=[])


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` (whose command is lm-eval) parsed by ``parser``: this command's own options
    wherever they stand before a ``--``, every other argument kept in order for the harness,
    and everything after the first ``--`` for the harness too."""
    argv = list(argv)
    start = argv.index(NAME)
    split = argv.index("--", start) if "--" in argv[start:] else len(argv)
    args, passed = parser.parse_known_args(argv[:split])
    args.harness_args = [*passed, *argv[split + 1 :]]
    return args


def run(args: argparse.Namespace) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate

        import quicksilver.integrations.lm_eval  # noqa: F401  (registers --model quicksilver)
        from quicksilver.lm_eval_tasks import prepare_tasks
    except ImportError as err:
        raise QuicksilverError(
            f"this needs the lm-eval extra ({err.name} is missing): pip install "
            "'quicksilver-llm[lm-eval]'"
        ) from None
    if args.wikitext_documents is not None and args.wikitext_documents < 1:
        raise QuicksilverError(
            f"--wikitext-documents must be positive, got {args.wikitext_documents}"
        )
    passed = list(args.harness_args)
    if not passed:
        raise QuicksilverError(
            "give the harness's arguments, e.g. --model quicksilver --tasks qs_facts_mc"
        )
    with tempfile.TemporaryDirectory(prefix="qs-lm-eval-") as tasks_dir:
        prepare_tasks(
            tasks_dir,
            wikitext_raw=args.wikitext_raw,
            wikitext_documents_limit=args.wikitext_documents,
        )
        include = ["--include_path", tasks_dir] if "--include_path" not in passed else []
        saved = sys.argv
        sys.argv = ["lm_eval", *passed, *include]
        try:
            cli_evaluate()
        except ValueError as err:
            missing = missing_tasks(err)
            if missing is None:
                raise
            raise QuicksilverError(
                f"unknown lm-eval task(s): {missing}; list the tasks with `quicksilver lm-eval "
                f"ls tasks` (offline ones here: {', '.join(OFFLINE_TASKS)})"
            ) from None
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
        finally:
            sys.argv = saved
    return 0
