"""Adaptive seeds: the looks of a sweep, the confidence each is tested at, and which cells get more seeds.

A matrix with `seeds: {min, max, step}` is judged after every round: a look at the data. Testing each
look at the matrix's `confidence` would let an undecided cell draw again and again until chance decides
it, so each of the K planned looks spends an equal share of the error: its bounds are at confidence
1 - (1 - confidence) / K (Bonferroni over the looks). The chance of a wrong "Converges" (or a wrong
"Convergence issue") over the whole sequence then stays at most 1 - confidence, whatever the data;
`harness.results.simulate` measures what it costs in seeds and power (README, "Adaptive seeds").
A plain seed list is one look, tested at `confidence` itself, as before.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Look:
    index: int = 1  # 1-based
    of: int = 1  # looks the matrix plans

    def confidence(self, overall: float) -> float:
        """The level of each look's one-sided bounds, so that all `of` looks together keep `overall`."""
        return 1 - (1 - overall) / self.of


def look_at(looks: list[int], n: int, spread_over: int | None = None) -> Look:
    """The look a cell with `n` planned seeds is at; between looks (a matrix edited since), the last one reached.
    `spread_over`: the looks the error is split over, when more than these (the sweep's seeds were edited)."""
    return Look(max(1, bisect.bisect_right(looks, n)), max(len(looks), spread_over or 0))


def spread_over(previous: dict | None, looks: list[int]) -> int:
    """How many looks the error is split over once a sweep's seeds are edited: never fewer than the sweep
    planned before. Verdicts already reached were tested at that share; were the rest tested at a larger
    one (a shorter seed list, a plain list after adaptive seeds), re-judging the same runs could decide
    at a looser level what the earlier looks left undecided."""
    before = (previous or {}).get("looks_k") or len((previous or {}).get("looks") or [])
    return max(before, len(looks))


def at_a_look(looks: list[int], n: int) -> int:
    """`n` seeds moved to a look: the smallest look holding at least n (capped at the last)."""
    return next((k for k in looks if k >= n), looks[-1])


class Judged(Protocol):  # a CellVerdict, as far as the rounds need it
    name: str
    baseline: str | None
    status: str
    runs: list  # RunVerdicts: a seed still `incomplete` (stopped, lost) is run again before the cell grows


def next_round(planned: dict[str, int], verdicts: Iterable[Judged], looks: list[int]) -> dict[str, int]:
    """The seeds each cell runs in the next round: an Inconclusive cell below the last look moves to its
    next look, and each baseline cell runs at least as many seeds as its cells (pairing by seed needs
    the baseline's seeds for every seed of the cell). Equal to `planned` when every cell is decided or full."""
    verdicts = list(verdicts)
    by_name = {v.name: v for v in verdicts}
    out = dict(planned)
    for v in verdicts:
        n = planned[v.name]
        compared = v.runs + (by_name[v.baseline].runs[:n] if v.baseline in by_name else [])
        finished = all(r.verdict != "incomplete" for r in compared)  # else this look is not done yet
        if v.status == "Inconclusive" and finished and n < looks[-1]:
            out[v.name] = looks[bisect.bisect_right(looks, n)]
    for v in verdicts:
        if v.baseline and v.baseline != v.name and v.baseline in out:
            out[v.baseline] = max(out[v.baseline], out[v.name])
    return out


def resumed(previous: dict | None, cells: Iterable[str], looks: list[int]) -> dict[str, int]:
    """Seeds per cell from the sweep's last matrix.json (the rounds it had reached), each moved to a look
    of the matrix as it is now; a cell it did not have starts at the first look."""
    before = {c["name"]: len(c["runs"]) for c in (previous or {}).get("cells", [])}
    return {name: at_a_look(looks, before.get(name, looks[0])) for name in cells}
