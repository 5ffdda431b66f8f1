"""`harness tune`: the command, with its progress bars. The session is harness/tuning/session.py, the
study harness/tuning/study.py, the report harness/tuning/report.py."""

from __future__ import annotations

from pathlib import Path

import typer

from harness.cli.app import DEVICE, REPORTS, RESULTS, app, console, failing, interruptible, load, one_cell
from harness.common.text import printable


@app.command()
def tune(
    matrix: str = typer.Argument(..., help="Matrix name (matrices/NAME.yaml) or a path; "
                                           "its `tune:` section is the search space."),
    cell: str | None = typer.Option(None, help='The cell to tune, as field=value pairs, e.g. "quant=nf4,algorithm=grpo".'),
    trials: int | None = typer.Option(None, help="Trials the study runs in all, counting those already done "
                                                 "(default: tune.trials)."),
    workers: int = typer.Option(1, min=1, help="Local worker processes sharing the study "
                                               "(more can join from elsewhere: same --storage)."),
    study: str | None = typer.Option(None, help="Study name (default: from the cell, e.g. quant-nf4)."),
    storage: str | None = typer.Option(None, help="An RDB URL (sqlite:///..., postgresql://...) or a journal file path; "
                                          "default: sqlite results/MATRIX/tune/optuna.db. "
                                          "Only RDB storages retry a killed worker's trial."),
    apply: bool = typer.Option(False, "--apply", help="Run nothing: write the best trial as a new matrix file "
                                                      "(see --out, --trial)."),
    trial: int | None = typer.Option(None, help="With --apply: this trial instead of the best "
                                                "(two objectives: the front's highest eval/reward)."),
    out: Path | None = typer.Option(None, help="With --apply: the new matrix file "
                                               "(default: matrices/MATRIX-tuned-STUDY.yaml; never overwritten)."),
    results: Path = RESULTS,
    reports: Path = REPORTS,
    device: str = DEVICE,
):
    """Search LoRA rank and beta (or any fields the matrix's `tune:` names) for one cell with Optuna.

    Each trial runs the cell once per seed (tune.seeds_per_trial), each an ordinary run under
    results/MATRIX/tune/STUDY/; their held-out eval/reward feeds the pruner, their final score (the
    verdicts', averaged over the seeds) is the objective. The
    cell's own values run first. Re-running the same command resumes the study (a killed trial
    runs again from its last checkpoint); a larger --trials extends it. The report is written to
    reports/MATRIX/tune_STUDY.{md,html}, linked from the matrix's report.

    Example: harness tune smoke --cell quant=nf4 --trials 8"""
    from harness.tuning import session as tuning
    from harness.tuning import study as t

    m = load(matrix)
    c = one_cell(m, cell)
    with failing():
        session = tuning.open_session(m, c, trials, study, storage, results)
    for note in session.notes:
        console.print(f"[yellow]note:[/] {printable(note)}", highlight=False)
    if apply:
        with failing():
            path, best = tuning.apply_trial(session, trial, out)
        console.print(printable(f"wrote {path}: {m.name} plus the cell {c.name} with trial {best.number}'s {best.params}\n"
                                f"run it: make sweep MATRIX={path.stem}"), highlight=False)
        return
    requeued = tuning.requeue(session)
    if requeued:
        console.print(f"[yellow]note:[/] queued again (killed or interrupted): trial {', '.join(map(str, requeued))}",
                      highlight=False)
    s = session.study
    console.print(f"[bold]study {printable(s.name)}[/] ({printable(t.shown(s.storage))}): {printable(c.name)}, "
                  f"{s.trials} trials, {workers} worker(s); runs under {printable(s.root)}", highlight=False)
    try:
        with failing(), interruptible("finished trials are kept; run the same command again to resume "
                                      "(the interrupted trial runs again from its last checkpoint)."):
            _run(session, workers, device)
    finally:
        path = tuning.write_reports(session, results, reports)
        console.print(f"tuning report: {printable(path)} and {printable(path.with_suffix('.html'))}")
    for b in t.best_trials(t.load(s)):
        console.print(f"best: {t.trial_line(b)}", markup=False, highlight=False)


def _run(session, workers: int, device: str) -> None:
    """The session's trials, with progress bars: per step in this process, per trial from the storage with workers."""
    from harness.execution.events import step_info
    from harness.execution.progress import progress_bar
    from harness.tuning import session as tuning
    from harness.tuning import study as t

    s = session.study
    with progress_bar(console) as bar:
        overall = bar.add_task("trials", total=s.trials, completed=t.tally(t.load(s))["done"], info="")
        current: dict[int, int] = {}

        def on_step(step, total, reward, eval, trial):
            if trial not in current:
                current.clear()
                current[trial] = bar.add_task(f"  trial {trial}", total=total, info="")
            bar.update(current[trial], completed=step, info=step_info(reward, eval))

        def on_trial(frozen):
            if frozen.number in current:
                bar.remove_task(current.pop(frozen.number))
            bar.console.print(t.trial_line(frozen), markup=False, highlight=False)
            bar.update(overall, completed=t.tally(t.load(s))["done"])

        tuning.run_trials(session, workers, device, on_trial, on_step, lambda done: bar.update(overall, completed=done))
