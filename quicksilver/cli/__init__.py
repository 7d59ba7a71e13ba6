"""The ``quicksilver`` command line: argument parsing and printing over the public API
(``import quicksilver as qs``), one module per command. ``main`` is the console script."""

from quicksilver.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
