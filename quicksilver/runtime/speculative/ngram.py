"""Prompt lookup: a row's own text proposes its continuation, at no model cost."""

from __future__ import annotations


def ngram_draft(history: list[int], limit: int, max_ngram: int, min_ngram: int = 1) -> list[int]:
    """The tokens after the latest earlier occurrence of the longest matching suffix."""
    size = len(history)
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        suffix = history[size - n :]
        # Latest occurrence that ends before the suffix itself and has a token after it.
        for begin in range(size - n - 1, -1, -1):
            if history[begin : begin + n] == suffix:
                follow = history[begin + n : begin + n + limit]
                if follow:
                    return follow
    return []
