"""Summaries of measured numbers that may be missing."""

from __future__ import annotations

import statistics

# What a logged metric holds in place of an infinite value (a mismatch log-ratio of a sampled token outside the
# trainer's truncated support): JSON has no inf, and the run loop stops a run on a non-finite metric as diverged.
# float32's largest value: it reads unmistakably as "infinite" and stays a number (reports print it as ∞).
INF_STANDIN = 3.4028234663852886e38


def mean(xs) -> float | None:
    """The mean of the numbers among `xs` (None and other values left out); None when there are none."""
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.fmean(xs) if xs else None


def median(xs) -> float | None:
    """The median of the numbers among `xs` (None and other values left out); None when there are none."""
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.median(xs) if xs else None
