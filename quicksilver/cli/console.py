"""What the CLI prints: results on stdout, notes and the one ``error:`` line on stderr.

Text reaching the terminal can carry what the user typed, including bytes that are not UTF-8
(Python passes them in as lone surrogates) and any amount of it; printing such text must not
raise in turn, so every line goes through ``printable`` first.
"""

from __future__ import annotations

import sys

# An error is one line a person reads: long inputs quoted back (a whole file name list, a
# megabyte of --prompt) are cut in the middle, keeping the start (what is wrong) and the end
# (usually how to fix it).
MAX_ERROR_CHARS = 300
_KEEP_HEAD = 200


def printable(text: str) -> str:
    """``text`` with lone surrogates (undecodable bytes from the command line) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` on one line (whitespace runs collapsed), cut in the middle past ``limit``."""
    line = " ".join(printable(text).split())
    if len(line) <= limit:
        return line
    tail = limit - _KEEP_HEAD - 5
    return f"{line[:_KEEP_HEAD]} ... {line[-tail:]}"


def show(text: str = "") -> None:
    """A result line on stdout."""
    print(printable(text), flush=True)


def say(message: str) -> None:
    """Progress, notes and warnings on stderr, so stdout holds only results."""
    print(printable(message), file=sys.stderr, flush=True)


def print_error(message: str) -> None:
    """The one line a failed run leaves on stderr."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
