"""`harness sweep`, `run`, `report`, `compare`: running and judging sweeps, over harness.api."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from harness import api
from harness.cli.app import (
    DEVICE,
    EXECUTOR,
    JOBS,
    MAX_RETRIES,
    MEMORY_GIB,
    RAY_ADDRESS,
    REPORTS,
    RESULTS,
    RETRY,
    RUNS_PER_GPU,
    WANDB,
    app,
    console,
    fail,
    failing,
    folder,
    interruptible,
    load,
    one_cell,
)
from harness.common.numbers import mean
from harness.common.text import number, printable

RESUME = "finished runs are kept; run the same command again to resume."


@app.command()
def sweep(
    matrix: str = typer.Argument("smoke", help="Matrix name (matrices/NAME.yaml) or a path to a YAML file."),
    results: Path = RESULTS,
    reports: Path = REPORTS,
    executor: str = EXECUTOR,
    jobs: int | None = JOBS,
    runs_per_gpu: str | None = RUNS_PER_GPU,
    ray_address: str = RAY_ADDRESS,
    memory_gib: float | None = MEMORY_GIB,
    wandb: str | None = WANDB,
    device: str = DEVICE,
    dry_run: bool = typer.Option(False, "--dry-run", help=(
        "Validate the matrix and the options (not this machine's devices), list the cells and run ids; train nothing.")),
    retry: str | None = RETRY,
    max_retries: int = MAX_RETRIES,
):
    """Run every cell of a matrix (skipping finished runs), then judge and report.

    Each run trains in a process of its own (--executor local, the default): one per visible GPU
    at a time (--runs-per-gpu N or auto packs several small runs on each), or --jobs N on CPU.
    A run that crashes or is killed is recorded and the sweep goes on; Ctrl-C stops it, and the
    same command resumes. --executor ray runs on a Ray cluster."""
    m = load(matrix)
    with failing():
        retries = api.retry(retry or (), max_retries)
    with failing():  # a dry run checks the options but not this machine's devices: that would import torch
        chosen = api.settings(executor, jobs, device, ray_address, runs_per_gpu, check_device=not dry_run)
    if dry_run:
        _list_cells(m)
        return
    with failing(), interruptible(RESUME), _progress() as progress:
        result = api.sweep(m, results, reports, chosen, memory_gib, wandb, retries, progress)
    _show_verdicts(result.plan.root.name, result.verdicts, result.report)
    if result.nothing_trained:
        console.print(f"[red]no run of {printable(m.name)} trained[/]: {result.nothing_trained}. "
                      "Each run's error is in the report and its summary.json")
        raise typer.Exit(1)


@app.command()
def run(
    config: Path | None = typer.Argument(None, help="A RunConfig YAML file (fields as in a matrix's `base`)."),
    matrix: str | None = typer.Option(None, help="Take the run from this matrix instead of a config file."),
    cell: str | None = typer.Option(None, help='With --matrix: the cell, as axis=value pairs, e.g. "quant=nf4".'),
    seed: int | None = typer.Option(None, help="Run only this seed of the cell (default: all its seeds)."),
    results: Path = RESULTS,
    executor: str = EXECUTOR,
    memory_gib: float | None = MEMORY_GIB,
    wandb: str | None = WANDB,
    device: str = DEVICE,
    retry: str | None = RETRY,
    max_retries: int = MAX_RETRIES,
):
    """Run one config file, or one cell of a matrix, into results/ (resuming it if interrupted)."""
    from harness.execution.jobs import pending

    with failing():
        retries = api.retry(retry or (), max_retries)
    with failing():
        chosen = api.settings(executor, None, device)
    if (config is None) == (matrix is None):
        raise fail("give a config file or --matrix NAME --cell 'axis=value', not both")
    if config is not None:
        with failing():
            jobs = [api.job(config, results)]
    else:
        m = load(matrix)
        picked = one_cell(m, cell)
        with failing():
            jobs = list(api.plan(m, results, [picked], seed, wandb).jobs)
    for job in jobs:
        if not pending([job], retries):
            console.print(f"already finished: {printable(job.run_dir)} (--retry STATUS, or delete the folder, to run it again)")
    _execute(jobs, chosen, memory_gib, retries)
    for job in jobs:
        console.print(f"results: {printable(job.run_dir)}")


@app.command()
def report(matrix: str = typer.Argument(..., help="Matrix name whose results to judge."), results: Path = RESULTS,
           reports: Path = REPORTS):
    """Re-judge a sweep's results and rewrite its report; trains nothing."""
    _judge_and_report(results / folder(Path(matrix).stem), reports)


@app.command()
def compare(
    a: Path = typer.Argument(..., help="A sweep's results folder, e.g. results/smoke, or a report folder with its "
                             "verdicts.json, e.g. the committed reference reports/smoke (the 'before')."),
    b: Path = typer.Argument(..., help="Another sweep of the same matrix: results or report folder (the 'after')."),
    fail_on_change: bool = typer.Option(False, "--fail-on-change", help="Exit 1 when any cell's status differs (for CI)."),
):
    """Which cells changed status between two sweeps, and how far their evidence moved.

    `harness compare reports/smoke results/smoke` checks a fresh sweep against the committed reference."""
    from harness.results.compare import compare as compare_sweeps

    with failing():
        changes = compare_sweeps(*(_verdicts(root) for root in (a, b)))
    moved = lambda x, y, d=3: f"{number(x, d)} → {number(y, d)}" + (  # noqa: E731
        f" ({y - x:+.{d}f})" if x is not None and y is not None else "")
    table = Table("cell", "status", "final eval/reward", "peak mem GiB", "median step s", title=printable(f"{a} → {b}"),
                  title_justify="left")
    for c in changes:
        status = f"[bold red]{c.status_a or 'absent'} → {c.status_b or 'absent'}[/]" if c.changed else c.status_a
        table.add_row(printable(c.name), status, moved(c.final_a, c.final_b), moved(c.memory_a, c.memory_b, 2),
                      moved(c.step_s_a, c.step_s_b, 2))
    console.print(table)
    n = sum(c.changed for c in changes)
    console.print(f"{n} of {len(changes)} cells changed status")
    if fail_on_change and n:
        raise typer.Exit(1)


def _verdicts(root: Path) -> list:
    """A results folder is judged again (its runs are there); a report folder gives the verdicts it was written from."""
    from harness.results.layout import DamagedFile
    from harness.results.verdict import read_verdicts

    if (root / "matrix.json").exists():
        return api.judge(root, write=False)
    if (root / "verdicts.json").exists():
        try:
            return read_verdicts(root / "verdicts.json")
        except (DamagedFile, ValueError, TypeError, KeyError) as e:
            raise fail(f"{root / 'verdicts.json'}: not a harness verdicts file ({e}); write it again with `harness report`")
    raise fail(f"{root} is neither a sweep's results folder (matrix.json) nor a report folder (verdicts.json); "
               "expected e.g. results/smoke or reports/smoke")


def _list_cells(m) -> None:
    table = Table("cell", "seeds", "run ids", "baseline", title=f"{printable(m.name)}: {len(m.cells)} cells (valid)",
                  title_justify="left")
    looks = m.spec.looks
    for cell in m.cells:
        base = m.baseline_of(cell)
        table.add_row(printable(cell.name), ",".join(str(r.seed) for r in cell.runs), " ".join(r.run_id for r in cell.runs),
                      printable(base.name) if base else "–")
    console.print(table)
    if len(looks) > 1:
        console.print(f"adaptive seeds: each cell runs the first {looks[0]} of its seeds, then more while it is Inconclusive, "
                      f"at looks of {', '.join(map(str, looks))} seeds (README, \"Adaptive seeds\")")


def _progress():
    from harness.execution.progress import RichProgress

    return RichProgress(console)


def _execute(jobs, chosen, memory_gib: float | None, retries) -> None:
    with failing(), interruptible(RESUME), _progress() as progress:
        api.execute(jobs, chosen, memory_gib, retries, progress)


def _judge_and_report(root: Path, reports: Path) -> None:
    with failing():
        verdicts = api.judge(root, root.parent)
        path = api.report(root, root.parent, reports, judged=True)
    _show_verdicts(root.name, verdicts, path)


def _show_verdicts(name: str, verdicts: list, path: Path) -> None:
    """The convergence table, the runs that could not be trusted, where the report is."""
    table = Table("cell", "status", "eval start → final", "why", title=f"{name}: convergence", title_justify="left")
    for v in verdicts:
        start = number(mean(v.stat("eval_start")))
        end = number(v.eval_final_mean)  # the report's: runs that trained to the end
        table.add_row(printable(v.name), v.status, f"{start} → {end}", printable(v.reason))
    console.print(table)
    untrusted = [r for v in verdicts for r in v.runs if r.damage]
    if untrusted:
        console.print(f"[yellow]could not trust {len(untrusted)} run(s)[/], judged as unfinished (the next sweep resumes them):")
        for r in untrusted:
            console.print(f"  {printable(r.run_id)} seed {r.seed}: {printable(r.damage)}")
    console.print(f"report: {printable(path)} and {printable(path.with_suffix('.html'))}")
