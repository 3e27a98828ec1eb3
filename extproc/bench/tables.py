"""What every benchmark's printed table shares: nearest-rank percentiles, durations, and
fixed-width lines from a column spec (name, width, alignment)."""

from __future__ import annotations

import math
from collections.abc import Sequence

Columns = Sequence[tuple[str, int, str]]


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted samples (0 for none)."""
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def duration(us: float) -> str:
    """Microseconds for a table cell: µs below 1 ms (one decimal below 100 µs), ms, s."""
    if us < 1000:
        return f"{us:.1f} µs" if us < 100 else f"{us:.0f} µs"
    if us < 1_000_000:
        return f"{us / 1000:.2f} ms"
    return f"{us / 1_000_000:.2f} s"


def line(cells: Sequence[str], columns: Columns) -> str:
    """One row: each cell padded to its column's width and alignment."""
    return "  ".join(
        f"{cell:{align}{width}}" for cell, (_, width, align) in zip(cells, columns, strict=True)
    ).rstrip()


def header(columns: Columns) -> str:
    return line([name for name, _, _ in columns], columns)
