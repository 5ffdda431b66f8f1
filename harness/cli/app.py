"""The `harness` Typer app, its console and the options commands share, and the one way a command
fails: a HarnessError's message in red and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

from harness.common.text import printable
from harness.errors import HarnessError, UsageError

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
JOBS = typer.Option(None, min=1, help="local: runs at a time (default: one per visible GPU, each pinned to it, "
                    "times --runs-per-gpu; 1 on CPU).")
RUNS_PER_GPU = typer.Option(None, "--runs-per-gpu", metavar="N|auto", help=(
    "local and ray: runs sharing each GPU at a time (default 1). A small run leaves most of a GPU idle: "
    "N packs N runs on each GPU, each pre-checked against 1/N of its memory (a run that does not fit its "
    "share is marked infeasible, not launched); auto packs floor(GPU memory x 0.8 / the largest memory-fit "
    "estimate), at most one run per CPU core. Every run gets cores / (runs at a time) CPU threads. "
    "Step times and throughput are then measured on a shared GPU (env.json: runs_per_gpu). "
    "On CPU use --jobs N instead."))
RAY_ADDRESS = typer.Option("auto", help="ray: the cluster, host:port, or auto (the one `ray start --head` started here).")
MEMORY_GIB = typer.Option(None, min=0, help="Memory of the device each run gets, for the fit pre-check (default: this device's; "
                          "shared by --jobs on CPU, by --runs-per-gpu on a GPU). Runs estimated above their share are "
                          "marked infeasible, not launched.")
WANDB = typer.Option(None, help="Mirror runs to W&B: offline (no network; `wandb sync` later), online, or off. "
                     "Default: the matrix's tracking.wandb.")
RETRY = typer.Option(None, help="Run again the finished runs that ended with these statuses (comma-separated: failed, killed, "
                     "oom), from their checkpoints; their old summary.json is kept in <run>/attempts/.")
MAX_RETRIES = typer.Option(1, min=0, help="Runs that were killed or ran out of memory are run again by the next sweep, "
                           "from their checkpoints, until retried this often. 0: keep them as they ended.")


def fail(message: str) -> typer.Exit:
    """Print `message` as an error, literally: it is plain text (data in it need no escaping, and
    markup in it is shown, not applied). Returns the exit (code 2) to raise."""
    console.print(f"[red]error:[/] {printable(message)}", markup=True, highlight=False)
    return typer.Exit(2)


@contextmanager
def failing() -> Iterator[None]:
    """A HarnessError inside becomes `fail(message)`: what the caller can fix, exit 2. A UsageError's
    message starts with the API's name for the argument ("executor: ..."): shown as its flag ("--executor: ...")."""
    try:
        yield
    except UsageError as e:
        message = str(e)
        if e.option and message.startswith(e.option):
            message = "--" + e.option.replace("_", "-") + message[len(e.option):]
        raise fail(message) from None
    except HarnessError as e:
        raise fail(str(e)) from None


@contextmanager
def interruptible(what: str) -> Iterator[None]:
    """Ctrl-C: say what is kept and how to resume, exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: {what}")
        raise typer.Exit(130) from None


def load(matrix: str):
    """The validated matrix, or exit 2 with its problems."""
    from harness import api

    with failing():
        return api.load(matrix)


def folder(name: str) -> str:
    """results/<name>/ and reports/<name>/ for a matrix or config file's name, as sweeps name them."""
    from harness.results.folders import folder_name

    try:
        return folder_name(name)
    except ValueError as e:
        raise fail(str(e)) from None


def one_cell(m, expr: str | None):
    """The one cell of `m` that `expr` selects, or exit 2 listing the cells."""
    from harness import api

    with failing():
        return api.one_cell(m, expr)


def run_config(path: Path):
    from harness.config.matrix import load_run_config

    with failing():
        return load_run_config(path)
