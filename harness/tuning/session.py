"""A tuning session from start to end, without a terminal: open (or resume) the study of one cell,
run its trials in this process or in worker processes, write its report, or apply a trial as a
new matrix. harness.api.tune and `harness tune` are thin layers over it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config.matrix import Cell, Matrix
from harness.errors import HarnessError, UsageError

if TYPE_CHECKING:
    from harness.tuning.study import Study


@dataclass
class Session:
    matrix: Matrix
    cell: Cell
    study: Study
    optuna_study: Any
    notes: list[str] = field(default_factory=list)  # what changed since the study was made, trials queued again


def open_session(m: Matrix, cell: Cell, trials: int | None = None, name: str | None = None, storage: str | None = None,
                 results: Path = Path("results")) -> Session:
    """The study of `cell` (created, or resumed with its trials), after its tune space is checked."""
    from harness.config.tune_space import check_space
    from harness.results.folders import folder_name
    from harness.tuning import study as t
    from harness.tuning.report import slug

    problems = check_space(cell.runs[0], m.spec.tune)
    if problems:
        raise UsageError(f"{m.path}: the tune space makes invalid configs for cell {cell.name}:\n"
                         + "\n".join(f"  - {p}" for p in problems))
    try:
        # a folder under results/ and reports/
        name = folder_name(name) if name else slug(cell.name.replace("=", "-").replace(",", "_"))
    except ValueError as e:
        raise UsageError(f"study: {e}") from None
    spec = m.spec.tune
    s = t.Study(name=name, storage=storage or t.default_storage(results, m.name), matrix=m.name, cell=cell.name,
                cell_cfg=cell.runs[0], spec=spec, trials=trials or spec.trials, root=results / m.name / "tune" / name,
                seeds=tuple(r.seed for r in cell.runs), criteria=m.spec.criteria)
    optuna_study, notes = t.create(s)
    extra = [x for x in s.trial_seeds if x not in s.seeds]
    if extra:
        notes.insert(0, f"tune.seeds_per_trial {spec.seeds_per_trial} is more than the cell's {len(s.seeds)} seed(s): "
                        f"trials also train seed(s) {', '.join(map(str, extra))}")
    return Session(m, cell, s, optuna_study, list(notes))


def run_trials(session: Session, workers: int = 1, device: str = "auto", on_trial: Callable | None = None,
               on_step: Callable | None = None, on_progress: Callable[[int], None] | None = None) -> None:
    """Run the study's remaining trials. One worker runs here (on_trial per finished trial, on_step per step);
    more are spawned processes, whose progress is read from the storage (on_progress with the number of trials done)."""
    from harness.execution.sweep import build_models
    from harness.tuning import study as t

    s = session.study
    build_models([s.cell_cfg])
    if workers == 1:
        t.work(s, 0, device, on_trial=on_trial, on_step=on_step)
    else:
        _work_in_processes(s, workers, device, on_progress or (lambda done: None))


def requeue(session: Session) -> list[int]:
    """Queue again the trials lost to a killed or interrupted worker (up to tune.max_retries each)."""
    from harness.tuning import study as t

    return t.requeue_lost(session.optuna_study, session.study.spec.max_retries)


def _work_in_processes(s: Study, workers: int, device: str, on_progress: Callable[[int], None]) -> None:
    """Spawned workers (CUDA and OpenMP don't survive fork) sharing the CPU's cores."""
    import multiprocessing

    from harness.tuning import study as t

    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=t.work, args=(s, i, device), kwargs={"threads": threads}, name=f"tune-worker-{i}")
             for i in range(workers)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            on_progress(t.tally(t.load(s))["done"])
            time.sleep(2)  # a progress display's refresh, not a wait for an event
        on_progress(t.tally(t.load(s))["done"])
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    failed = [f"{p.name} (exit {p.exitcode})" for p in procs if p.exitcode]
    if failed:
        raise HarnessError(f"worker(s) failed: {', '.join(failed)}; their output is above. Finished trials are kept.")


def write_reports(session: Session, results: Path, reports: Path) -> Path:
    """The tuning report (reports/<matrix>/tune_<study>.md and .html), and the matrix's report
    rewritten (if its sweep has run) so it links it. The tuning report's Markdown path."""
    from harness.reports import write_report
    from harness.results.verdict import judge
    from harness.tuning import study as t
    from harness.tuning.report import write_tune_report

    path = write_tune_report(t.load(session.study), session.study, reports)
    root = results / session.matrix.name
    if (root / "matrix.json").exists():
        judge(root)
        write_report(root, reports / session.matrix.name)
    return path


def apply_trial(session: Session, number: int | None = None, out: Path | None = None) -> tuple[Path, Any]:
    """Write trial `number` (default: the best) as a new matrix file beside the matrix: (its path, the trial)."""
    from optuna.trial import TrialState

    from harness.tuning import study as t

    m, s = session.matrix, session.study
    if number is not None:
        chosen = [x for x in session.optuna_study.get_trials(deepcopy=False) if x.number == number]
        if not chosen or chosen[0].state != TrialState.COMPLETE:
            raise UsageError(f"--trial {number}: no finished trial with that number in study {s.name}")
        best = chosen[0]
    else:
        front = t.best_trials(session.optuna_study)
        if not front:
            raise UsageError(f"study {s.name} has no finished trial yet: run `harness tune {m.name} --cell ...` first")
        best = front[0]
    target = out or m.path.with_name(f"{m.name}-tuned-{s.name}.yaml")
    try:
        return t.apply(m.path, session.cell.key, s, best, target), best
    except (FileExistsError, ValueError) as e:
        raise UsageError(str(e)) from None
