"""`harness seeds`: what adaptive seeds decide, and at what cost, for a seed spread you measured."""

from __future__ import annotations

import typer

from harness.cli.app import app, console, fail


@app.command()
def seeds(
    min_seeds: int = typer.Option(3, "--min", help="seeds.min: seeds every cell runs first."),
    max_seeds: int = typer.Option(12, "--max", help="seeds.max: seeds an undecided cell may reach."),
    step: int | None = typer.Option(None, help="seeds.step: seeds added per round (default: --min)."),
    sd: float = typer.Option(0.021, help="Seed sd of a run's final score. 0.021: the H200 smoke study (24 seeds, "
                             "mean of the last evals); measure yours with `harness table SWEEP --kind runs`."),
    delta: list[float] = typer.Option([0.0, -0.05, -0.1], help="True Δ vs the baseline to simulate (repeat the option)."),
    tolerance: float = typer.Option(0.05, help="criteria.tolerance"),
    confidence: float = typer.Option(0.9, help="criteria.confidence: over all looks together."),
    trials: int = typer.Option(4000, help="Simulated sweeps per Δ: the rates' standard error is about sqrt(p(1-p)/trials)."),
    seed: int = typer.Option(0, help="Seed of the simulation itself."),
    uncorrected: bool = typer.Option(False, "--uncorrected", help="Also test every look at `confidence` itself, "
                                     "to see the error rate the per-look correction prevents."),
):
    """Simulate adaptive seeds ({min, max, step}) on synthetic seeds: for each true Δ, how often a cell
    ends Converges, Convergence issue or Inconclusive, and how many seeds it takes.

    It runs the sweep's own verdict and rounds code on normal final scores with the given sd, the
    two cells independent at each seed. Prints a Markdown table (the README's "Adaptive seeds" is one)."""
    from pydantic import ValidationError

    from harness.config.matrix import AdaptiveSeeds, Criteria
    from harness.results.simulate import simulate

    try:
        spec = AdaptiveSeeds(min=min_seeds, max=max_seeds, step=step)
        c = Criteria(tolerance=tolerance, confidence=confidence)
    except ValidationError as e:
        err = e.errors()[0]
        where = f"--{err['loc'][0]}" if err["loc"] else "--min/--max"
        raise fail(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None
    if sd <= 0:
        raise fail(f"--sd: the seed sd of a final score, above 0; got {sd}")
    if trials < 1:
        raise fail(f"--trials: at least 1; got {trials}")
    looks = spec.looks
    console.print(f"looks at {', '.join(map(str, looks))} seeds; sd {sd}; tolerance {tolerance}; confidence {confidence:.0%} "
                  f"over all looks ({1 - (1 - confidence) / len(looks):.2%} each); {trials} trials per row\n")
    console.print("| true Δ | looks tested at | Converges | Convergence issue | Inconclusive | mean seeds |")
    console.print("|---|---|---|---|---|---|")
    for corrected in (True, False) if uncorrected else (True,):
        for d in delta:
            r = simulate(d, sd, looks, c, trials, seed, corrected=corrected)
            level = "per-look share" if corrected else "confidence each"
            console.print(f"| {d:+.2f} | {level} | {r.converges:.1%} | {r.issue:.1%} | {r.inconclusive:.1%} | "
                          f"{r.mean_seeds:.1f} |", markup=False)
