"""Which differences between trials a study has resolved, with the verdicts' own statistics.

Each compared trial's final scores (seed -> score, `trial.seed_scores`) are set against the best
trial's with `verdict.difference` (paired over shared seeds, Welch otherwise) at the matrix's
`criteria.confidence`. Pure functions of those numbers: tested without training anything.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from harness.results.intervals import MAX_SEEDS_SUGGESTED, Difference, difference, seeds_to_decide

TOP = 5  # the best and the next four, plus the matrix's own values wherever they rank


@dataclass(frozen=True)
class Comparison:
    number: int
    label: str  # e.g. "the best", "the matrix's values"
    scores: dict[int, float]  # seed -> final score
    diff: Difference | None  # this trial - the best; None for the best itself, or too few seeds
    resolved: bool
    text: str

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores.values())


def rule(confidence: float, seeds_per_trial: int) -> str:
    """The rule, in words, for the report."""
    if seeds_per_trial < 2:
        return ("Each trial trained one seed, so no difference between trials can be resolved: one score per trial has no "
                "seed spread to judge a difference by (the smoke configuration's seed sd of the final score is about "
                "0.02-0.03). Set tune.seeds_per_trial to 2 or more to have differences tested.")
    return (f"Δ = trial − the best trial in final score (the verdicts' score: the mean of a run's evals in the final window), "
            f"over its seeds, with the verdicts' statistics at criteria.confidence {confidence:.0%}: paired one-sided t bounds "
            f"when both trials finished the same seeds, Welch's one-sided t bounds otherwise. A difference is resolved when "
            f"both one-sided {confidence:.0%} bounds lie on one side of 0 (upper bound < 0: the trial is shown worse than the "
            f"best; lower bound > 0: shown better); otherwise it is not resolved from the seeds run. The best is the trial "
            f"with the highest mean, chosen after seeing the scores, so its lead is somewhat optimistic: no correction is made "
            f"for picking the best of many trials.")


def compare(scores: dict[int, dict[int, float]], best: int, confidence: float, power: float = 0.8,
            labels: dict[int, str] | None = None, top: int = TOP) -> list[Comparison]:
    """The best trial, then the `top - 1` next by mean score and every labelled trial (the matrix's
    values), each against the best. scores: trial number -> seed -> final score."""
    labels = labels or {}
    ranked = sorted((n for n in scores if scores[n] and n != best), key=lambda n: -statistics.fmean(scores[n].values()))
    chosen = ranked[:top - 1] + [n for n in ranked[top - 1:] if n in labels]
    label = "the best" + (f"; {labels[best]}" if best in labels else "")
    out = [Comparison(best, label, scores[best], None, False,
                      f"the best: mean {statistics.fmean(scores[best].values()):.3f} over {_seeds(scores[best])}")]
    for n in chosen:
        d = difference(scores[n], scores[best], confidence)
        resolved = d is not None and (d.upper < 0 or d.lower > 0)
        out.append(Comparison(n, labels.get(n, ""), scores[n], d, resolved, _text(d, scores[n], scores[best], confidence, power)))
    return out


def _text(d: Difference | None, ours: dict[int, float], best: dict[int, float], confidence: float, power: float) -> str:
    if d is None:
        if max(len(ours), len(best)) < 2:
            return "not resolved: one seed per trial, so no difference can be"
        return f"not resolved: {_seeds(ours)} here and {_seeds(best)} in the best, and a test needs 2 on each side"
    bounds = f"Δ {d.mean:+.3f}, {confidence:.0%} one-sided bounds [{d.lower:+.3f}, {d.upper:+.3f}] ({d.method})"
    if d.upper < 0:
        return f"resolved: worse than the best ({bounds}: the upper bound is below 0)"
    if d.lower > 0:
        return f"resolved: better than the best ({bounds}: the lower bound is above 0)"
    n = len(set(ours) & set(best)) if d.paired else min(len(ours), len(best))
    need = seeds_to_decide(d, 0.0, confidence, power) if d.mean else None
    more = (f"about {need} seeds per trial would likely resolve it" if need
            else f"more than {MAX_SEEDS_SUGGESTED} seeds per trial would be needed")
    return f"not resolved from {n} seeds ({bounds} include 0; {more}, {power:.0%} power, if Δ and the spread stay as observed)"


def _seeds(scores: dict[int, float]) -> str:
    return f"{len(scores)} seed{'s' if len(scores) != 1 else ''}"
