"""The statistics behind a cell's verdict: one-sided bounds on Δ (paired by seed, Welch otherwise), the
two-sided interval of a mean, and how many seeds would likely decide an undecided difference."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from functools import lru_cache

from scipy import stats

MAX_SEEDS_SUGGESTED = 64  # beyond this the suggestion reads "more than 64": the difference sits on the tolerance itself


@lru_cache(maxsize=4096)
def t_ppf(q: float, df: float) -> float:
    """Student-t quantile; cached, since the simulations of adaptive seeding ask for the same few again and again."""
    return float(stats.t.ppf(q, df))


@dataclass
class Difference:
    """Δ = ours - theirs in final score, with one-sided bounds at `confidence`."""

    mean: float
    lower: float
    upper: float
    method: str
    paired: bool
    sds: tuple[float, ...]  # paired: (sd of the differences,); unpaired: (sd of ours, sd of theirs)


def difference(ours: dict[int, float], theirs: dict[int, float], confidence: float) -> Difference | None:
    """Seeds shared by both cells are paired (same seed: same prompts drawn, same initial noise);
    otherwise Welch's unpaired interval. None with fewer than 2 seeds on a side."""
    shared = sorted(ours)
    if ours.keys() == theirs.keys() and len(shared) >= 2:  # pairing a subset would drop the other seeds unseen
        d = [ours[s] - theirs[s] for s in shared]
        mean, sd = statistics.fmean(d), statistics.stdev(d)
        half = t_ppf(confidence, len(d) - 1) * sd / math.sqrt(len(d))
        half = float(half)
        return Difference(mean, mean - half, mean + half, f"paired one-sided t bounds over {len(d)} seeds", True, (sd,))
    if len(ours) < 2 or len(theirs) < 2:
        return None
    a, b = list(ours.values()), list(theirs.values())
    mean = statistics.fmean(a) - statistics.fmean(b)
    half = (float(t_ppf(confidence, welch_df(a, b)))
            * math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b)))
    return Difference(mean, mean - half, mean + half, "Welch one-sided t bounds", False,
                      (statistics.stdev(a), statistics.stdev(b)))


def welch_df(a: list[float], b: list[float]) -> float:
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return len(a) + len(b) - 2
    return (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))


def seeds_to_decide(d: Difference, tolerance: float, confidence: float, power: float) -> int | None:
    """Seeds per arm with which the bound would likely clear -tolerance (with `power`), were the true Δ
    and the seed spread what was observed: the smallest n with (t_conf + t_power) x se(n) <= |Δ + tolerance|.
    None: more than MAX_SEEDS_SUGGESTED."""
    margin = abs(d.mean + tolerance)
    for n in range(2, MAX_SEEDS_SUGGESTED + 1):
        if d.paired:
            se, df = d.sds[0] / math.sqrt(n), n - 1
        else:
            va, vb = d.sds[0] ** 2 / n, d.sds[1] ** 2 / n
            se = math.sqrt(va + vb)
            df = (va + vb) ** 2 / ((va**2 + vb**2) / (n - 1)) if va + vb > 0 else 2 * n - 2
        if (t_ppf(confidence, df) + t_ppf(power, df)) * se <= margin:
            return n
    return None


def t_interval(xs: list[float], confidence: float) -> tuple[float, float]:
    """Two-sided Student-t interval for the mean of xs (n >= 2)."""
    n, mean = len(xs), statistics.fmean(xs)
    half = t_ppf(0.5 + confidence / 2, n - 1) * statistics.stdev(xs) / math.sqrt(n)
    return float(mean - half), float(mean + half)
