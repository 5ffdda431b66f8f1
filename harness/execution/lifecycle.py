"""Runs: one run's lifecycle (config, env, metrics, summary even on failure), the in-process
executor, and what the process-isolated executors (executor_local, executor_ray) share."""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.config.run import Frozen, RunConfig
from harness.common.text import printable
from harness.recipes import NonFinite, Pruned
from harness.registries import ALGORITHMS, EXECUTORS
from harness.results.layout import (
    damage,
    past_attempts,
    read_json,
    read_metrics,
    reopen,
    summarize_metrics,
    truncate_logs,
    write_json_atomic,
)
from harness.common.system import device_identity, device_name, git_commit, library_versions, pick_device
from harness.tracking.files import JsonlTracker, Trackers


class RunOptions(Frozen):
    """What a run does besides training that is not part of its identity (not in its run_id):
    where it is mirrored, what evaluates it afterwards, what the pre-check expected of it."""

    matrix: str = ""
    label: str = ""
    tags: tuple[str, ...] = ()  # the cell's axis values, "quant=nf4"
    wandb: dict | None = None  # tracking_wandb.WandbSettings fields
    lm_eval: dict | None = None  # lm_eval_run.LmEvalSettings fields
    memory_estimate: dict | None = None  # memory_fit.estimate()


@dataclass(frozen=True)
class Job:
    cfg: RunConfig
    run_dir: Path
    options: RunOptions = field(default_factory=RunOptions)

    @property
    def label(self) -> str:
        return f"{self.options.label or self.cfg.run_id} seed={self.cfg.seed}"


def run_one(cfg: RunConfig, run_dir: Path, device: torch.device, progress=None, options: RunOptions = RunOptions()) -> dict:
    """Train one run into run_dir and write its summary.json, whatever happens except Ctrl-C.

    An unfinished run_dir is resumed from its last checkpoint; metric rows logged after that
    checkpoint are dropped first, so the resumed run appends no duplicates.
    """
    from harness.models import checkpoint
    progress = progress or (lambda **kw: None)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_at, logged = checkpoint.saved_step(run_dir), max((r["step"] for r in read_metrics(run_dir)), default=-1)
    if resume_at > logged:  # rows before the checkpoint were lost (a damaged metrics.jsonl): resuming would leave a gap
        checkpoint.discard(run_dir)
        resume_at = -1
    truncate_logs(run_dir, resume_at)
    env_path = run_dir / "env.json"
    env = read_json(env_path) if env_path.exists() else {}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    env = {"started_at": env.get("started_at", now), "resumed_at": env.get("resumed_at", []) + ([now] if env else []),
           "device": device_name(device), "git_commit": git_commit(), "versions": library_versions()} | device_identity(device)
    write_json_atomic(env_path, env)

    tracker = _trackers(cfg, run_dir, options)
    tracker.log_config(cfg.model_dump(mode="json"))
    summary = {"run_id": cfg.run_id, "status": "ok", "error": None, "device": env["device"], "memory_estimate": options.memory_estimate}
    start = time.time()
    try:
        if cfg.rollout.engine == "vllm":  # checked once per configuration, cached beside the sweep's runs
            from harness.rollout.engine_check import require

            summary["engine_check"] = require(cfg, run_dir.parent, device).get("logprob_diff_mean")
        summary |= ALGORITHMS.get(cfg.algorithm)(cfg, run_dir, tracker, device, progress)
    except NonFinite as e:
        summary |= {"status": "nan", "error": str(e)}
    except Pruned as e:
        summary |= {"status": "pruned", "error": str(e)}
    except (torch.OutOfMemoryError, MemoryError) as e:
        summary |= {"status": "oom", "error": f"{type(e).__name__}: {e}"[:2000]}
    except Exception as e:  # recorded, not raised: one broken cell must not stop a sweep
        summary |= {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
    summary |= {"wall_s": round(time.time() - start, 2)} | summarize_metrics(read_metrics(run_dir))
    if options.lm_eval and summary["status"] == "ok":
        summary["lm_eval"] = _lm_eval(cfg, run_dir, device, options.lm_eval)
    tracker.finish(summary)
    return summary


def _trackers(cfg: RunConfig, run_dir: Path, options: RunOptions):
    """The JSONL tracker (the source of truth, its summary.json written last), mirrored to W&B when asked."""
    mirrors = []
    if options.wandb is not None:
        from harness.tracking.wandb import WandbSettings, WandbTracker

        mirrors.append(WandbTracker(run_dir, cfg.model_dump(mode="json"), WandbSettings(**options.wandb), group=options.matrix,
                                    name=f"{options.label or cfg.run_id} seed={cfg.seed}", tags=list(options.tags)))
    return Trackers(mirrors + [JsonlTracker(run_dir)])


def _lm_eval(cfg: RunConfig, run_dir: Path, device: torch.device, settings: dict) -> dict:
    """lm-eval on the final policy; its failure is recorded beside the run's own results, which stand."""
    from harness.evals.lm_eval import LmEvalSettings, evaluate_run

    try:
        return evaluate_run(cfg, run_dir, device, LmEvalSettings(**settings))
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:2000]}


@dataclass(frozen=True)
class ExecutorSettings:
    device: str = "auto"
    jobs: int | None = None  # local: parallel runs (default: one per visible GPU, else 1)
    ray_address: str = "auto"  # ray: an existing cluster


def run_sequential(jobs: list[Job], settings: ExecutorSettings, console: Console) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per run would break up the sweep's own
    dev = pick_device(settings.device)
    with progress_bar(console) as bar:
        overall = bar.add_task("sweep", total=len(jobs), info="")
        for job in jobs:
            task = bar.add_task(f"  {printable(job.label)}", total=job.cfg.train.steps, info="")

            def on_step(step, total, reward, eval):
                bar.update(task, completed=step, info=step_info(reward, eval))

            if own_process_needed(job.cfg, dev):  # no per-step progress from the child: the bar moves when it ends
                summary = in_own_process(run_one, job.cfg, job.run_dir, dev, None, job.options)
            else:
                summary = run_one(job.cfg, job.run_dir, dev, on_step, job.options)
            bar.remove_task(task)
            bar.advance(overall)
            bar.console.print(one_line(job, summary))


def progress_bar(console: Console) -> Progress:
    """An overall bar plus one per run, each with its latest reward and eval (tasks take an `info` field)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    return Progress(*columns, console=console, transient=False)


def step_info(reward: float, eval: float | None) -> str:
    return f"reward {reward:.2f}" + (f"  eval {eval:.3f}" if eval is not None else "")


def own_process_needed(cfg: RunConfig, device: torch.device) -> bool:
    """vLLM's sleep-mode allocator (CuMem) serves one engine per process and is not handed back
    when an engine closes, so each colocated vLLM engine on CUDA (a run, a check) gets a fresh process."""
    return cfg.rollout.colocation == "colocated" and device.type == "cuda"


def in_own_process(fn, *args):
    """fn(*args) in a freshly spawned Python process (not forked: CUDA is initialised here); its
    return value or its exception comes back."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def one_line(job: Job, s: dict) -> str:
    where = printable(f"{job.label} [{job.cfg.run_id}]")  # unescaped, rich takes "[bead269e9bd2]" for a style and drops it
    if s["status"] != "ok":
        return f"[red]✗[/] {where} {printable(s['status'])}: {printable(s['error'])}"
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    return f"[green]✓[/] {where} eval {fmt(s['eval_start'])} → {fmt(s['eval_end'])} in {s['wall_s']:.0f} s"


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
            return Pending(job, f"ended {status}: retried from its checkpoint ({used + 1} of --max-retries {retry.max_retries})", summary)
    return None


def reopen_all(todo: list[Pending]) -> None:
    """Finished runs about to run again lose their summary.json (kept in attempts/), so workers run them."""
    for p in todo:
        if p.old_summary is not None:
            reopen(p.job.run_dir, p.old_summary)


def execute(jobs: list[Job], executor: str, settings: ExecutorSettings, console: Console) -> None:
    EXECUTORS.get(executor)(jobs, settings, console)


# --- shared by the executors that run each job in a process of its own (local, ray)

def last_step(run_dir: Path) -> tuple[int, str]:
    """(the last logged step, its step_info) from metrics.jsonl: how a parent follows a child's progress."""
    rows = read_metrics(run_dir)
    if not rows or "reward/mean" not in rows[-1]:
        return (rows[-1]["step"] if rows else 0), ""
    return rows[-1]["step"], step_info(rows[-1]["reward/mean"], rows[-1].get("eval/reward"))


def record_lost(job: Job, status: str, error: str) -> dict:
    """summary.json for a run whose process died without writing one (killed, segfault, OOM killer)."""
    rows = read_metrics(job.run_dir)
    truncate_logs(job.run_dir, max((r["step"] for r in rows), default=-1))  # the line it died writing is not damage
    summary = {"run_id": job.cfg.run_id, "status": status, "error": error, "memory_estimate": job.options.memory_estimate}
    summary |= summarize_metrics(rows)
    write_json_atomic(job.run_dir / "summary.json", summary)
    return summary
