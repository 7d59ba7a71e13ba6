"""Errors shared across quicksilver."""


class QuicksilverError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""
