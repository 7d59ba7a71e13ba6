"""Errors shared across quicksilver."""


class QuicksilverError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""


class InvalidArgument(QuicksilverError, ValueError):
    """An argument that cannot work: wrong type, out of range, empty, or too long for the
    model. Raised before any model work starts."""
