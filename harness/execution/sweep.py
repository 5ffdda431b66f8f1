"""From a validated matrix to the jobs an executor runs: run folders, what each run does besides
training (tracking, lm-eval), and the memory-fit pre-check that keeps runs which cannot fit
from being launched."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from harness.common.files import write_json_atomic
from harness.config.matrix import Cell, Matrix
from harness.execution.jobs import RETRYABLE, Job, RunOptions
from harness.results.layout import read_summary

if TYPE_CHECKING:
    import torch


def jobs_of(m: Matrix, results: Path, cells: list[Cell] | None = None, wandb: str | None = None,
            planned: dict[str, int] | None = None, looks_k: int | None = None) -> list[Job]:
    """One job per planned run of `cells` (default: all), under results/<matrix>/<run_id>; writes matrix.json.
    `planned`: seeds per cell name (adaptive seeds; default the first look). `wandb` (off, offline,
    online) overrides the matrix's tracking.wandb.mode."""
    root = results / m.name
    planned = planned or {}
    write_json_atomic(root / "matrix.json", m.to_json(planned, looks_k))
    tracking = m.spec.tracking.wandb
    if wandb == "off":
        tracking = None
    elif wandb is not None:
        from harness.tracking.wandb import WandbSettings

        tracking = (tracking or WandbSettings()).model_copy(update={"mode": wandb})
    if tracking is not None:
        from harness.tracking.wandb import require_wandb

        require_wandb()
    lm_eval = m.spec.eval.lm_eval
    if lm_eval is not None and importlib.util.find_spec("lm_eval") is None:
        raise RuntimeError("eval.lm_eval needs lm-evaluation-harness: pip install -e '.[eval]'")
    jobs = []
    for cell in cells or m.cells:
        options = RunOptions(
            matrix=m.name, label=cell.name, tags=tuple(f"{k}={v}" for k, v in cell.key.items()),
            wandb=tracking.model_dump() if tracking else None, lm_eval=lm_eval.model_dump(mode="json") if lm_eval else None,
        )
        jobs += [Job(cfg, root / cfg.run_id, options) for cfg in cell.runs[:planned.get(cell.name, m.spec.looks[0])]]
    return jobs


def precheck(jobs: list[Job], device: torch.device, capacity_gib: float,
             shared_by: int = 1) -> tuple[list[Job], list[Job]]:
    """(jobs to launch, each carrying its memory estimate; jobs found infeasible, recorded as such).
    `capacity_gib` is the device's; `shared_by` runs at a time share it (--jobs on CPU, --runs-per-gpu),
    so each must fit its share: a packed run that does not is infeasible rather than OOMing its neighbours.

    An infeasible run's summary.json has status `infeasible`, the estimate and the capacity; it is
    estimated again by the next sweep (which may run on a larger device) rather than skipped."""
    from harness.execution.memory_fit import estimate

    share = capacity_gib / shared_by
    flag = "--jobs" if device.type == "cpu" else "--runs-per-gpu"
    where = device.type + (f" (its {capacity_gib:.2f} GiB shared by {shared_by} runs at a time: fewer with {flag})"
                           if shared_by > 1 else "")
    launch, infeasible = [], []
    for job in jobs:
        est = estimate(job.cfg, device)
        need = est.get("fit_gib")
        if need is not None and need > share:
            error = f"needs about {need:.2f} GiB (estimate), {share:.2f} GiB available on {where}: not launched"
            write_json_atomic(job.run_dir / "summary.json",
                              {"run_id": job.cfg.run_id, "status": "infeasible", "error": error, "memory_estimate": est,
                               "capacity_gib": share, "shared_by": shared_by})
            infeasible.append(job)
        else:
            (job.run_dir / "summary.json").unlink(missing_ok=True)  # an earlier sweep's `infeasible`
            launch.append(Job(job.cfg, job.run_dir, job.options.model_copy(update={"memory_estimate": est})))
    return launch, infeasible


def build_models(cfgs) -> None:
    """Built-in models and shapes' folders once, here, rather than by several runs at once."""
    from harness.models.loading import resolve

    for name in sorted({cfg.model for cfg in cfgs if cfg.model.startswith(("builtin:", "shape:"))}):
        resolve(name)


def mirror_verdicts(jobs: list[Job], verdicts) -> None:
    """The verdicts, known once the whole sweep is judged, into the W&B runs that mirrored its runs."""
    settings = next((j.options.wandb for j in jobs if j.options.wandb), None)
    if settings is None:
        return
    from harness.tracking.wandb import WandbSettings, record_verdicts

    root = jobs[0].run_dir.parent
    fields = {root / r.run_id: {"verdict/run": r.verdict, "verdict/cell": v.status, "verdict/reason": v.reason}
              for v in verdicts for r in v.runs}
    record_verdicts(fields, WandbSettings(**settings), group=jobs[0].options.matrix)


def statuses(jobs: list[Job]) -> Counter:
    """How the runs ended: summary.json's status, or `unfinished` (none, or one that cannot be trusted)."""
    return Counter((read_summary(j.run_dir) or {"status": "unfinished"})["status"] for j in jobs)


def kept_errors(jobs: list[Job]) -> str:
    """'2 failed, 1 killed': the finished runs among `jobs` that ended in an error ('' when none did)."""
    counts = statuses(jobs)
    return ", ".join(f"{counts[s]} {s}" for s in RETRYABLE if counts[s])
