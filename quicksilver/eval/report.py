"""Reporting results: plain-text or markdown tables and throughput records (files are
written through ``quicksilver.outputs``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False
) -> str:
    """Numbers right-aligned, text left-aligned; markdown pipes when asked."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        all(_is_number(row[i]) or row[i] is None for row in rows) and i > 0
        for i in range(len(headers))
    ]

    def line(row: Sequence[str]) -> str:
        parts = [
            row[i].rjust(widths[i]) if numeric[i] else row[i].ljust(widths[i])
            for i in range(len(row))
        ]
        return "| " + " | ".join(parts) + " |" if markdown else "  ".join(parts).rstrip()

    if markdown:
        rule = (
            "|"
            + "|".join(
                "-" * (w + 1) + ":" if numeric[i] else "-" * (w + 2) for i, w in enumerate(widths)
            )
            + "|"
        )
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if value else "0"
    return str(value)


def summary_record(
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
    prefill: list[float],
    decode: list[float],
) -> dict[str, Any]:
    """One engine's measurement at one batch size: the best repeat and every repeat."""
    prefill_s, decode_s = min(prefill), min(decode)
    decoded = batch * (new_tokens - 1)
    return {
        "batch_size": batch,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "prefill_tokens_per_s": batch * prompt_tokens / prefill_s if prefill_s > 0 else 0.0,
        "decode_tokens_per_s": decoded / decode_s if decode_s > 0 else 0.0,
        "decode_step_seconds": decode_s / (new_tokens - 1),
        "prefill_seconds_all": prefill,
        "decode_seconds_all": decode,
    }
