"""The harness as a Python library; `harness` (the CLI) is a thin layer over these functions.

    import harness
    result = harness.sweep("smoke", on_event=print)     # plan, execute, judge, report
    df = harness.steps(result.plan.root)                # every logged step of every run
    df.groupby(["cell", "step"])["eval/reward"].mean().unstack(0).plot()

The steps are also separate: `plan` (a matrix into jobs), `execute` (run what is not finished),
`judge` and `report`; `run` runs one config. Problems a caller can fix raise
`harness.errors.HarnessError` subclasses. Heavy libraries (torch, transformers, pandas) are
imported by the functions that need them, so importing this module is cheap."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from harness.config.matrix import Cell, Matrix, MatrixError, find_matrix, load_matrix, load_run_config
from harness.config.run import RunConfig
from harness.errors import HarnessError, SweepNotFound, Unavailable, UsageError
from harness.execution.events import Infeasible, Note, OnEvent, Planned, Rerun, ignore
from harness.execution.jobs import RETRYABLE, ExecutorSettings, Job, Retry, pending, reopen_all
from harness.registries import EXECUTORS
from harness.registry import UnknownName
from harness.results.folders import folder_name

if TYPE_CHECKING:
    import pandas as pd

    from harness.results.verdict import CellVerdict

WANDB_MODES = ("off", "offline", "online")


def matrices_dir() -> Path:
    """matrices/ in the working directory, else the one beside the package (a source checkout)."""
    here = Path("matrices")
    return here if here.is_dir() else Path(__file__).resolve().parents[1] / "matrices"


def load(matrix: str | Path | Matrix) -> Matrix:
    """A validated matrix from its name (matrices/NAME.yaml), a path, or as given."""
    if isinstance(matrix, Matrix):
        return matrix
    try:
        return load_matrix(find_matrix(str(matrix), matrices_dir()))
    except MatrixError:
        raise
    except (OSError, ValueError) as e:  # no such matrix; a name Path refuses (a NUL byte)
        raise UsageError(str(e)) from None


@dataclass(frozen=True)
class Plan:
    """A sweep's jobs: one per run of the chosen cells, under results/<matrix>/<run_id>."""

    matrix: Matrix
    results: Path
    jobs: tuple[Job, ...]
    planned: dict[str, int] = field(default_factory=dict)  # seeds per cell name: the round adaptive seeds reached

    @property
    def root(self) -> Path:
        return self.results / self.matrix.name


def plan(matrix: str | Path | Matrix, results: str | Path = "results", cells: str | list[Cell] | None = None,
         seed: int | None = None, wandb: str | None = None, planned: dict[str, int] | None = None) -> Plan:
    """The jobs of `matrix`: every cell, or those `cells` selects ("quant=nf4"), every seed or one.
    With adaptive seeds, each cell's seeds so far: `planned` (cell name -> seeds), else the rounds the
    sweep's matrix.json had reached, else the first look. `wandb` (off, offline, online) overrides the
    matrix's tracking.wandb. Writes matrix.json."""
    from harness.execution.sweep import jobs_of

    m = load(matrix)
    if wandb not in (None, *WANDB_MODES):
        raise UsageError(f"wandb {wandb!r}: valid: {', '.join(WANDB_MODES)}", "wandb")
    chosen = select(m, cells) if isinstance(cells, str) else cells
    reached, looks_k = _rounds_reached(m, Path(results))
    planned = reached | (planned or {})
    try:
        jobs = jobs_of(m, Path(results), chosen, wandb, planned, looks_k)
    except RuntimeError as e:  # W&B or lm-eval asked for but not installed
        raise Unavailable(str(e)) from None
    if seed is not None:
        every, jobs = jobs, [j for j in jobs if j.cfg.seed == seed]
        if not jobs:  # the seeds planned so far: an adaptive matrix's later seeds are not runs yet
            raise UsageError(f"seed {seed}: the chosen cells' seeds are {sorted({j.cfg.seed for j in every})}", "seed")
    return Plan(m, Path(results), tuple(jobs), planned)


def _rounds_reached(m: Matrix, results: Path) -> tuple[dict[str, int], int]:
    """Seeds per cell that the sweep's last matrix.json planned (a killed adaptive sweep resumes there), and
    how many looks the error is split over (never fewer than that sweep's: results.looks.spread_over)."""
    from harness.results.layout import read_json
    from harness.results.looks import resumed, spread_over

    path = results / m.name / "matrix.json"
    try:
        previous = read_json(path) if path.is_file() else None
    except ValueError:  # torn: the sweep starts again from the first look, and keeps every finished run
        previous = None
    return resumed(previous, [c.name for c in m.cells], m.spec.looks), spread_over(previous, m.spec.looks)


def select(m: Matrix, cells: str) -> list[Cell]:
    """The cells of `m` matching "axis=value,..."; UsageError listing the cells when none does."""
    try:
        chosen = m.select(cells)
    except ValueError as e:
        raise UsageError(f"cell {cells!r}: {e}", "cell") from None
    if not chosen:
        listing = "\n".join(f"  {c.name}" for c in m.cells)
        raise UsageError(f"cell {cells!r} matches no cell of {m.name}; cells:\n{listing}", "cell")
    return chosen


def one_cell(m: Matrix, cells: str | None) -> Cell:
    """The one cell of `m` that `cells` selects; UsageError listing the cells when it is not exactly one."""
    try:
        chosen = m.select(cells or "")
    except ValueError as e:
        raise UsageError(f"cell {cells!r}: {e}", "cell") from None
    if len(chosen) != 1:
        listing = "\n".join(f"  {c.name}" for c in m.cells)
        raise UsageError(f"cell {cells!r} matches {len(chosen)} cells of {m.name}; choose one of:\n{listing}", "cell")
    return chosen[0]


def settings(executor: str = "local", jobs: int | None = None, device: str = "auto",
             ray_address: str = "auto", runs_per_gpu: int | str | None = None, check_device: bool = True) -> ExecutorSettings:
    """Validated executor settings: the executor exists and, unless `check_device` is off (a dry run,
    which must not import torch), a run can start on each of this machine's slots. `runs_per_gpu`:
    runs sharing each GPU (local, ray), a number or "auto" (README, "Packing runs on a GPU"); default 1."""
    from harness.execution.packing import parse_runs_per_gpu, slots

    try:
        executor = EXECUTORS.canonical(executor)
    except UnknownName as e:
        raise UsageError(f"executor: {e}", "executor") from None
    if jobs is not None and executor != "local":
        raise UsageError(f"jobs applies to the local executor, not {executor}", "jobs")
    try:
        runs_per_gpu = parse_runs_per_gpu(runs_per_gpu)
    except ValueError as e:
        raise UsageError(str(e), "runs_per_gpu") from None
    if runs_per_gpu not in (None, 1) and (executor not in ("local", "ray") or device == "cpu"):
        where = "--device cpu has no GPU to share" if device == "cpu" else f"the {executor} executor runs one run at a time"
        raise UsageError(f"runs_per_gpu {runs_per_gpu}: {where}; it applies to GPUs with the local and ray executors "
                         "(on CPU, --jobs N, jobs=N in Python, runs N at a time)", "runs_per_gpu")
    chosen = ExecutorSettings(executor=executor, device=device, jobs=jobs, ray_address=ray_address, runs_per_gpu=runs_per_gpu)
    if check_device and executor != "ray":  # a Ray cluster's GPUs are not this machine's
        try:
            slots(chosen)
        except ValueError as e:
            raise UsageError(str(e), "runs_per_gpu" if str(e).startswith("runs_per_gpu") else "device") from None
    return chosen


def retry(statuses: str | tuple[str, ...] = (), max_retries: int = 1) -> Retry:
    """Which finished runs run again: those that ended with `statuses` ("failed,oom"), and killed or
    OOM runs until retried `max_retries` times."""
    chosen = frozenset(x.strip() for x in (statuses.split(",") if isinstance(statuses, str) else statuses) if x.strip())
    unknown = sorted(chosen - set(RETRYABLE))
    if unknown:
        raise UsageError(f"retry {statuses}: {', '.join(unknown)} is not a status to retry; valid: {', '.join(RETRYABLE)}",
                         "retry")
    return Retry(chosen, max_retries)


def execute(jobs: Plan | list[Job], executor: ExecutorSettings | None = None, memory_gib: float | None = None,
            retry: Retry = Retry(), on_event: OnEvent = ignore, what: str = "run") -> list[Job]:
    """Run the jobs that are not finished (README, "Re-running a sweep") with `executor`, after the
    memory-fit pre-check; the jobs it launched. Ctrl-C raises KeyboardInterrupt once every run has
    stopped: the finished ones are kept and the same call resumes the rest."""
    from harness.common.system import pick_device
    from harness.execution import packing
    from harness.execution.lifecycle import execute as run_jobs
    from harness.execution.memory_fit import capacity_gib
    from harness.execution.sweep import build_models, kept_errors, precheck

    if isinstance(jobs, Plan):
        what, jobs = f"{jobs.matrix.name}: {len(jobs.matrix.cells)} cells", list(jobs.jobs)
    executor = executor or settings()
    todo = pending(jobs, retry)
    on_event(Planned(what, len(jobs), len(todo)))
    for p in todo:
        if p.why not in ("new", "resumed"):
            on_event(Rerun(p.job, p.why))
    again = {p.job.run_dir for p in todo}
    kept = kept_errors([j for j in jobs if j.run_dir not in again])
    if kept:
        on_event(Note(f"kept as finished: {kept}; `--retry failed,killed,oom` "
                      '(in Python: retry=harness.retry("failed,killed,oom")) runs them again'))
    if not todo:
        return []
    reopen_all(todo)
    launch = [p.job for p in todo]
    build_models(j.cfg for j in launch)
    device = pick_device(executor.device)
    capacity = memory_gib or capacity_gib(device)
    executor, chose = packing.resolve(executor, launch, device, capacity)  # runs_per_gpu auto, from the estimates
    if chose:
        on_event(Note(chose))
    # runs at a time on one device (--jobs on CPU, --runs-per-gpu) share its memory
    launch, infeasible = precheck(launch, device, capacity, packing.shared_by(executor, device))
    for job in infeasible:
        from harness.results.layout import read_json

        on_event(Infeasible(job, read_json(job.run_dir / "summary.json")["error"]))
    if launch:
        try:
            run_jobs(launch, executor, on_event)
        except RuntimeError as e:  # an executor that cannot start (no Ray cluster, Ray not installed)
            raise Unavailable(str(e)) from None
    return launch


def _root(sweep: Plan | str | Path, results: str | Path) -> Path:
    """A sweep's results folder from a plan, a matrix name (under `results`) or the folder itself."""
    if isinstance(sweep, Plan):
        return sweep.root
    path = Path(sweep)
    try:
        root = path if (path / "matrix.json").exists() else Path(results) / folder_name(path.stem)
    except ValueError as e:  # a name no results folder can have
        raise UsageError(f"sweep {str(sweep)!r}: {e}", "sweep") from None
    if not (root / "matrix.json").exists():
        raise SweepNotFound(f"no sweep at {root} (no matrix.json): run `harness sweep {path.stem}` first")
    return root


def judge(sweep: Plan | str | Path, results: str | Path = "results", write: bool = True) -> list[CellVerdict]:
    """Each cell's verdict (Converges, Does not converge, Inconclusive, ...) with its evidence;
    `write` keeps them in the sweep's verdicts.json."""
    from harness.results.layout import DamagedFile
    from harness.results.verdict import judge as judge_sweep

    root = _root(sweep, results)
    try:
        return judge_sweep(root, write=write)
    except DamagedFile as e:  # matrix.json or verdicts.json: the sweep's own files, which a re-run rewrites
        raise HarnessError(f"{e}; `harness sweep {root.name}` rewrites it") from None


def report(sweep: Plan | str | Path, results: str | Path = "results", reports: str | Path = "reports",
           judged: bool = False) -> Path:
    """Write reports/<matrix>/report.md and report.html; the Markdown path. The sweep is judged
    first unless `judged` (its verdicts.json is current)."""
    root = _root(sweep, results)
    if not judged:
        judge(root)
    return _write_report(root, Path(reports))


def _write_report(root: Path, reports: Path) -> Path:
    from harness.reports import write_report
    from harness.results.layout import DamagedFile

    try:
        return write_report(root, reports / root.name)
    except DamagedFile as e:
        raise HarnessError(f"{e}; `harness sweep {root.name}` rewrites it") from None


@dataclass(frozen=True)
class SweepResult:
    plan: Plan
    verdicts: list[CellVerdict]
    report: Path
    statuses: Counter  # how the runs ended: ok, failed, killed, oom, infeasible, unfinished...

    @property
    def nothing_trained(self) -> str | None:
        """'3 failed, 1 oom' when every run ended in an error or was infeasible: the sweep has nothing to show."""
        if self.plan.jobs and set(self.statuses) <= {*RETRYABLE, "infeasible"}:
            return ", ".join(f"{n} {s}" for s, n in sorted(self.statuses.items()))
        return None


def sweep(matrix: str | Path | Matrix, results: str | Path = "results", reports: str | Path = "reports",
          executor: ExecutorSettings | None = None, memory_gib: float | None = None, wandb: str | None = None,
          retry: Retry = Retry(), on_event: OnEvent = ignore) -> SweepResult:
    """Run every cell of `matrix` (skipping finished runs), then judge and report it. With adaptive
    seeds, rounds: after each, the cells still Inconclusive (and their baselines) get more seeds,
    until every cell is decided or at seeds.max. A killed sweep resumes at the round it reached."""
    from harness.execution.sweep import mirror_verdicts, statuses
    from harness.results.looks import next_round

    planned = plan(matrix, results, wandb=wandb)
    looks = planned.matrix.spec.looks
    while True:
        execute(planned, executor, memory_gib, retry, on_event)
        retry = Retry(frozenset(), retry.max_retries)  # runs ended `failed` were retried once; later rounds keep them
        verdicts = judge(planned)
        more = next_round(planned.planned, verdicts, looks)
        if more == planned.planned:
            break
        grown = [f"{name} {planned.planned[name]} → {n}" for name, n in more.items() if n != planned.planned[name]]
        on_event(Note(f"adaptive seeds: {len(grown)} cell(s) run more seeds, undecided or baseline of one: "
                      + "; ".join(grown)))
        planned = plan(planned.matrix, results, wandb=wandb, planned=more)
    mirror_verdicts(list(planned.jobs), verdicts)
    return SweepResult(planned, verdicts, _write_report(planned.root, Path(reports)), statuses(list(planned.jobs)))


def run(config: RunConfig | str | Path, results: str | Path = "results", name: str | None = None,
        executor: ExecutorSettings | None = None, memory_gib: float | None = None, retry: Retry = Retry(),
        on_event: OnEvent = ignore) -> Job:
    """Run one config (a RunConfig, or a YAML file of one) into results/<name>/<run_id>, resuming
    it if it was interrupted; `name` defaults to the file's stem ("run" for an object)."""
    one = job(config, results, name)
    execute([one], executor, memory_gib, retry, on_event)
    return one


def job(config: RunConfig | str | Path, results: str | Path = "results", name: str | None = None) -> Job:
    """The job of one config (a RunConfig, or a YAML file of one): its folder is results/<name>/<run_id>."""
    if not isinstance(config, RunConfig):
        path = Path(config)
        name, config = name or path.stem, load_run_config(path)
    try:
        folder = folder_name(name or "run")
    except ValueError as e:
        raise UsageError(str(e)) from None
    return Job(config, Path(results) / folder / config.run_id)


def steps(sweep: Plan | str | Path, results: str | Path = "results") -> pd.DataFrame:
    """One row per logged step per run: every metric a column, beside the run's cell, axis values and seed."""
    from harness.results import tables

    return tables.steps(_root(sweep, results))


def runs(sweep: Plan | str | Path, results: str | Path = "results") -> pd.DataFrame:
    """One row per run: its summary and its verdict."""
    from harness.results import tables

    return tables.runs(_root(sweep, results))


def cells(sweep: Plan | str | Path, results: str | Path = "results") -> pd.DataFrame:
    """One row per cell: its status and the evidence behind it."""
    from harness.results import tables

    return tables.cells(_root(sweep, results))


@dataclass(frozen=True)
class TuneResult:
    report: Path  # reports/<matrix>/tune_<study>.md (and .html)
    best: list  # the best trials (optuna FrozenTrial): one, or the Pareto front with two objectives
    notes: list[str]  # what changed since the study was made
    requeued: list[int]  # trials queued again, lost to a killed or interrupted worker


def tune(matrix: str | Path | Matrix, cell: str, trials: int | None = None, workers: int = 1, study: str | None = None,
         storage: str | None = None, results: str | Path = "results", reports: str | Path = "reports", device: str = "auto",
         on_trial=None, on_step=None, on_progress=None) -> TuneResult:
    """Optuna over the `tune:` space of one cell (README, "Tuning"): run the study's remaining trials
    (resuming it) and write its report. One worker calls on_trial per finished trial and on_step per
    step; several call on_progress with the trials done. `harness.tuning.session` has the steps apart."""
    from harness.tuning import session as tuning
    from harness.tuning import study as optuna_study

    m = load(matrix)
    session = tuning.open_session(m, one_cell(m, cell), trials, study, storage, Path(results))
    requeued = tuning.requeue(session)
    try:
        tuning.run_trials(session, workers, device, on_trial, on_step, on_progress)
    finally:
        path = tuning.write_reports(session, Path(results), Path(reports))
    return TuneResult(path, optuna_study.best_trials(optuna_study.load(session.study)), session.notes, requeued)
