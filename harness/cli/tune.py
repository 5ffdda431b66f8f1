"""`harness tune`: the command. The study itself is harness/tune/study.py; the report, tune_report.py."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer

from harness.cli import DEVICE, REPORTS, RESULTS, _fail, _folder, _load, _one_cell, app, console
from harness.common.text import printable
from harness.execution.sweep import build_models


@app.command()
def tune(
    matrix: str = typer.Argument(..., help="Matrix name (matrices/NAME.yaml) or a path; its `tune:` section is the search space."),
    cell: Optional[str] = typer.Option(None, help='The cell to tune, as field=value pairs, e.g. "quant=nf4,algorithm=grpo".'),
    trials: Optional[int] = typer.Option(None, help="Trials the study runs in all, counting those already done (default: tune.trials)."),
    workers: int = typer.Option(1, min=1, help="Local worker processes sharing the study (more can join from elsewhere: same --storage)."),
    study: Optional[str] = typer.Option(None, help="Study name (default: from the cell, e.g. quant-nf4)."),
    storage: Optional[str] = typer.Option(None, help="An RDB URL (sqlite:///..., postgresql://...) or a journal file path; "
                                          "default: sqlite results/MATRIX/tune/optuna.db. Only RDB storages retry a killed worker's trial."),
    apply: bool = typer.Option(False, "--apply", help="Run nothing: write the best trial as a new matrix file (see --out, --trial)."),
    trial: Optional[int] = typer.Option(None, help="With --apply: this trial instead of the best (two objectives: the front's highest eval/reward)."),
    out: Optional[Path] = typer.Option(None, help="With --apply: the new matrix file (default: matrices/MATRIX-tuned-STUDY.yaml; never overwritten)."),
    results: Path = RESULTS,
    reports: Path = REPORTS,
    device: str = DEVICE,
):
    """Search LoRA rank and beta (or any fields the matrix's `tune:` names) for one cell with Optuna.

    Each trial is an ordinary run of the cell under results/MATRIX/tune/STUDY/; its held-out
    eval/reward at each evaluation feeds the pruner, its final eval/reward is the objective. The
    cell's own values run first. Re-running the same command resumes the study (a killed trial
    runs again from its last checkpoint); a larger --trials extends it. The report is written to
    reports/MATRIX/tune_STUDY.{md,html}, linked from the matrix's report.

    Example: harness tune smoke --cell quant=nf4 --trials 8"""
    from harness.tune import study as t
    from harness.tune.report import slug, write_tune_report
    from harness.config.tune_space import check_space

    m = _load(matrix)
    c = _one_cell(m, cell)
    problems = check_space(c.runs[0], m.spec.tune)
    if problems:
        raise _fail(f"{m.path}: the tune space makes invalid configs for cell {c.name}:\n" + "\n".join(f"  - {p}" for p in problems))
    name = _folder(study) if study else slug(c.name.replace("=", "-").replace(",", "_"))  # a folder under results/ and reports/
    spec = m.spec.tune
    s = t.Study(name=name, storage=storage or t.default_storage(results, m.name), matrix=m.name, cell=c.name, cell_cfg=c.runs[0],
                spec=spec, trials=trials or spec.trials, root=results / m.name / "tune" / name)
    try:
        optuna_study, notes = t.create(s)
    except t.StudyMismatch as e:
        raise _fail(str(e)) from None
    for note in notes:
        console.print(f"[yellow]note:[/] {printable(note)}", highlight=False)

    if apply:
        _apply(m, c, s, optuna_study, trial, out)
        return
    requeued = t.requeue_lost(optuna_study, spec.max_retries)
    if requeued:
        console.print(f"[yellow]note:[/] queued again (killed or interrupted): trial {', '.join(map(str, requeued))}", highlight=False)
    build_models([s.cell_cfg])
    console.print(f"[bold]study {printable(name)}[/] ({printable(t.shown(s.storage))}): {printable(c.name)}, {s.trials} trials, "
                  f"{workers} worker(s); runs under {printable(s.root)}", highlight=False)
    try:
        if workers == 1:
            _work_here(s, device)
        else:
            _work_in_processes(s, workers, device)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished trials are kept; run the same command again to resume "
                      "(the interrupted trial runs again from its last checkpoint).")
        raise typer.Exit(130) from None
    finally:
        path = write_tune_report(t.load(s), s, reports)
        _refresh_matrix_report(m.name, results, reports)
        console.print(f"tuning report: {printable(path)} and {printable(path.with_suffix('.html'))}")
    best = t.best_trials(t.load(s))
    for b in best:
        console.print(f"best: {t.trial_line(b)}", markup=False, highlight=False)


def _work_here(s, device: str) -> None:
    from harness.tune import study as t
    from harness.execution.lifecycle import progress_bar, step_info

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

        t.work(s, 0, device, on_trial=on_trial, on_step=on_step)


def _work_in_processes(s, workers: int, device: str) -> None:
    """Spawned workers (CUDA and OpenMP don't survive fork) sharing the CPU's cores; this process
    shows the study's progress from the storage."""
    import multiprocessing

    from harness.tune import study as t
    from harness.execution.lifecycle import progress_bar

    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=t.work, args=(s, i, device), kwargs={"threads": threads}, name=f"tune-worker-{i}") for i in range(workers)]
    for p in procs:
        p.start()
    try:
        with progress_bar(console) as bar:
            overall = bar.add_task("trials", total=s.trials, info="")
            while any(p.is_alive() for p in procs):
                bar.update(overall, completed=t.tally(t.load(s))["done"])
                time.sleep(2)
            bar.update(overall, completed=t.tally(t.load(s))["done"])
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    failed = [f"{p.name} (exit {p.exitcode})" for p in procs if p.exitcode]
    if failed:
        raise _fail(f"worker(s) failed: {', '.join(failed)}; their output is above. Finished trials are kept.")


def _apply(m, c, s, optuna_study, number: Optional[int], out: Optional[Path]) -> None:
    from harness.tune import study as t
    from optuna.trial import TrialState

    if number is not None:
        chosen = [x for x in optuna_study.get_trials(deepcopy=False) if x.number == number]
        if not chosen or chosen[0].state != TrialState.COMPLETE:
            raise _fail(f"--trial {number}: no finished trial with that number in study {s.name}")
        best = chosen[0]
    else:
        front = t.best_trials(optuna_study)
        if not front:
            raise _fail(f"study {s.name} has no finished trial yet: run `harness tune {m.name} --cell ...` first")
        best = front[0]
    target = out or m.path.with_name(f"{m.name}-tuned-{s.name}.yaml")
    try:
        path = t.apply(m.path, c.key, s, best, target)
    except (FileExistsError, ValueError) as e:
        raise _fail(str(e)) from None
    console.print(printable(f"wrote {path}: {m.name} plus the cell {c.name} with trial {best.number}'s {best.params}\n"
                            f"run it: make sweep MATRIX={path.stem}"), highlight=False)


def _refresh_matrix_report(matrix: str, results: Path, reports: Path) -> None:
    """Re-write the matrix's report (if its sweep has run) so it links the tuning report."""
    from harness.report.markdown import write_report
    from harness.results.verdict import judge

    root = results / matrix
    if (root / "matrix.json").exists():
        judge(root)
        write_report(root, reports / matrix)
