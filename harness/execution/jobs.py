"""What a sweep hands its executor: jobs (a run config, its folder, what it does besides training),
the executor's settings, and which runs must run (new, resumed, damaged, retried). Light: no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.config.run import Frozen, RunConfig
from harness.results.layout import damage, past_attempts, read_json, reopen


class RunOptions(Frozen):
    """What a run does besides training that is not part of its identity (not in its run_id):
    where it is mirrored, what evaluates it afterwards, what the pre-check expected of it."""

    matrix: str = ""
    label: str = ""
    tags: tuple[str, ...] = ()  # the cell's axis values, "quant=nf4"
    wandb: dict | None = None  # tracking.wandb.WandbSettings fields
    lm_eval: dict | None = None  # evals.lm_eval.LmEvalSettings fields
    memory_estimate: dict | None = None  # memory_fit.estimate()


@dataclass(frozen=True)
class Job:
    cfg: RunConfig
    run_dir: Path
    options: RunOptions = field(default_factory=RunOptions)

    @property
    def label(self) -> str:
        return f"{self.options.label or self.cfg.run_id} seed={self.cfg.seed}"


@dataclass(frozen=True)
class ExecutorSettings:
    executor: str = "local"  # a name in harness.registries.EXECUTORS
    device: str = "auto"
    jobs: int | None = None  # local: parallel runs (default: one per visible GPU, else 1)
    ray_address: str = "auto"  # ray: an existing cluster
    # local and ray: runs sharing each GPU, a number or "auto" (execution.packing); None: 1
    runs_per_gpu: int | str | None = None


RETRYABLE = ("failed", "killed", "oom")  # the statuses `--retry` re-runs
LOST = ("killed", "oom")  # retried automatically, up to --max-retries: the run may fit when it runs again


@dataclass(frozen=True)
class Retry:
    """Which finished runs a sweep runs again, besides the unfinished and damaged ones it always resumes."""

    statuses: frozenset[str] = frozenset()  # --retry: runs that ended with these statuses, however often they did
    max_retries: int = 1  # --max-retries: killed and OOM runs, until they have been retried this often


@dataclass(frozen=True)
class Pending:
    """A run a sweep must run, and why (README, "Re-running a sweep")."""

    job: Job
    why: str
    old_summary: dict | None = None  # a finished run's, filed under attempts/ by `reopen` before it runs again


def pending(jobs: list[Job], retry: Retry = Retry()) -> list[Pending]:
    """The jobs that must run: unfinished (resumed), damaged (resumed), infeasible before, or retried."""
    return [p for p in (_pending(job, retry) for job in jobs) if p is not None]


def _pending(job: Job, retry: Retry) -> Pending | None:
    path = job.run_dir / "summary.json"
    if not path.exists():
        return Pending(job, "resumed" if (job.run_dir / "metrics.jsonl").exists() else "new")
    problem = damage(job.run_dir)
    if problem:
        return Pending(job, f"damaged results, resumed: {problem}", {"status": "damaged", "error": problem})
    summary = read_json(path)
    status = summary["status"]
    if status == "infeasible":  # estimated again each sweep: the next device may be larger
        return Pending(job, "infeasible before: estimated again")
    if status in retry.statuses:
        return Pending(job, f"ended {status}: retried (--retry {status})", summary)
    if status in LOST:
        used = sum(a.get("status") in LOST for a in past_attempts(job.run_dir))
        if used < retry.max_retries:
            return Pending(job, f"ended {status}: retried from its checkpoint ({used + 1} of --max-retries {retry.max_retries})",
                           summary)
    return None


def reopen_all(todo: list[Pending]) -> None:
    """Finished runs about to run again lose their summary.json (kept in attempts/), so workers run them."""
    for p in todo:
        if p.old_summary is not None:
            reopen(p.job.run_dir, p.old_summary)
