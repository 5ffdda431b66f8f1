"""Summaries of measured numbers that may be missing."""

from __future__ import annotations

import statistics


def mean(xs) -> float | None:
    """The mean of the numbers among `xs` (None and other values left out); None when there are none."""
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.fmean(xs) if xs else None


def median(xs) -> float | None:
    """The median of the numbers among `xs` (None and other values left out); None when there are none."""
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.median(xs) if xs else None
