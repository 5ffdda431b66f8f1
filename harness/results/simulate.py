"""What adaptive seeding guarantees and costs, measured on synthetic seeds from known distributions.

Each trial draws a baseline cell and a cell Δ below it (final scores normal with sd `sd` per seed,
independent between the two cells at a seed, as the H200 smoke study's bf16 and nf4 seeds were:
correlation -0.09), then runs the sweep's own procedure on them: `judge_cell` at each look and
`next_round` to decide who gets more seeds. Nothing here re-implements a rule; a change to the
verdicts or the rounds changes what this measures. `harness seeds` prints it; the README's table is
its output, and tests/test_adaptive_seeds.py checks the two agree within simulation error.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from harness.config.matrix import Criteria
from harness.results.looks import Look, look_at, next_round
from harness.results.verdict import RunVerdict, judge_cell

START = 0.4  # every synthetic seed starts here: the step-0 eval of the smoke configuration


@dataclass(frozen=True)
class Rates:
    """Share of trials ending in each verdict for the cell, and the seeds it took."""

    delta: float
    trials: int
    converges: float
    issue: float  # Convergence issue: shown worse than the baseline
    inconclusive: float
    mean_seeds: float  # seeds the cell ran, averaged over trials

    def se(self, rate: float) -> float:
        """Simulation standard error of a rate estimated from `trials` trials."""
        return math.sqrt(max(rate * (1 - rate), 1 / self.trials) / self.trials)


def _runs(scores: list[float]) -> list[RunVerdict]:
    return [RunVerdict(f"synthetic-{i}", i, "converged", "synthetic", eval_start=START, eval_final=x, trained_to_end=True)
            for i, x in enumerate(scores)]


def one_trial(base: list[float] | list[RunVerdict], cell: list[float] | list[RunVerdict], looks: list[int], c: Criteria,
              corrected: bool = True, spread_over: int | None = None) -> tuple[str, int]:
    """The cell's verdict and its seeds, when the sweep judges these runs (or final scores) look by look,
    each side's runs in the order the rounds would add them. `spread_over`: the looks the matrix planned,
    when only the first of them (`looks`) can be run."""
    base, cell = (x if x and isinstance(x[0], RunVerdict) else _runs(x) for x in (base, cell))
    planned = {"baseline": looks[0], "cell": looks[0]}
    while True:
        at = {name: look_at(looks, n, spread_over) if corrected else Look() for name, n in planned.items()}
        b = judge_cell("baseline", {}, None, base[:planned["baseline"]], "baseline", None, c, True, at["baseline"])
        v = judge_cell("cell", {}, None, cell[:planned["cell"]], "baseline", b, c, True, at["cell"])
        more = next_round(planned, [b, v], looks)
        if more == planned:
            return v.status, planned["cell"]
        planned = more


def simulate(delta: float, sd: float, looks: list[int], c: Criteria, trials: int = 4000, seed: int = 0,
             mean: float = 0.7, corrected: bool = True) -> Rates:
    """Rates of each verdict for a cell whose true final score is `delta` from its baseline's.
    `corrected=False` tests every look at the matrix's confidence: what the correction protects against."""
    rng = random.Random(seed)
    counts = {"Converges": 0, "Convergence issue": 0, "Inconclusive": 0}
    seeds = 0
    for _ in range(trials):
        base = [rng.gauss(mean, sd) for _ in range(looks[-1])]
        cell = [rng.gauss(mean + delta, sd) for _ in range(looks[-1])]
        status, n = one_trial(base, cell, looks, c, corrected)
        counts[status] = counts.get(status, 0) + 1
        seeds += n
    return Rates(delta, trials, counts["Converges"] / trials, counts["Convergence issue"] / trials,
                 counts["Inconclusive"] / trials, seeds / trials)


def resample(base: list[RunVerdict], cell: list[RunVerdict], looks: list[int], c: Criteria, trials: int = 2000,
             seed: int = 0) -> dict[str, float]:
    """Share of verdicts when the adaptive procedure runs on seeds drawn from real runs: each trial puts
    the cell's runs, and the baseline's, in a random order (the order the rounds add them), paired by seed
    when both cells ran the same seeds, independently otherwise. Looks past the runs there are not taken,
    but every look still gets its share of the error of all `looks`, as in the sweep; the last look a pool
    reaches draws all of it, so only the earlier looks vary. Returns each status's share and `mean_seeds`."""
    rng = random.Random(seed)
    paired = {r.seed for r in cell} <= {r.seed for r in base}
    by_seed = {r.seed: r for r in base}
    planned_looks = len(looks)
    looks = [k for k in looks if k <= min(len(cell), len(base))] or [min(len(cell), len(base))]
    counts: dict[str, float] = {}
    seeds = 0
    for _ in range(trials):
        order = rng.sample(cell, len(cell))
        if paired:  # the baseline's runs of the same seeds, in the same order, then the rest
            rest = [r for r in base if r.seed not in {x.seed for x in order}]
            theirs = [by_seed[r.seed] for r in order] + rng.sample(rest, len(rest))
        else:
            theirs = rng.sample(base, len(base))
        status, n = one_trial(theirs, order, looks, c, spread_over=planned_looks)
        counts[status] = counts.get(status, 0) + 1
        seeds += n
    return {k: v / trials for k, v in counts.items()} | {"mean_seeds": seeds / trials}
