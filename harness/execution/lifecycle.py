"""Runs: one run's lifecycle (config, env, metrics, summary even on failure), the in-process
executor, and what the process-isolated executors (execution.local, execution.ray) share."""

from __future__ import annotations

import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from harness.common.files import write_json_atomic
from harness.common.system import device_identity, device_name, dtype_reason, git_commit, library_versions, pick_device
from harness.config.run import RunConfig
from harness.execution.events import Ended, OnEvent, Started, Stepped
from harness.execution.isolation import in_own_process, own_process_needed
from harness.execution.jobs import ExecutorSettings, Job, RunOptions
from harness.models.loading import identity
from harness.recipes import NonFinite, Pruned
from harness.registries import ALGORITHMS, EXECUTORS
from harness.results.layout import (
    read_json,
    read_metrics,
    summarize_metrics,
    truncate_logs,
)
from harness.tracking.files import JsonlTracker, Tracker, Trackers


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
           "device": device_name(device), "git_commit": git_commit(), "versions": library_versions(),
           "model": identity(cfg.model), "compute_dtype": dtype_reason(device, cfg.train.dtype)} | device_identity(device)
    write_json_atomic(env_path, env)

    tracker = _trackers(cfg, run_dir, options)
    tracker.log_config(cfg.model_dump(mode="json"))
    summary = {"run_id": cfg.run_id, "status": "ok", "error": None, "device": env["device"],
               "memory_estimate": options.memory_estimate}
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


def _trackers(cfg: RunConfig, run_dir: Path, options: RunOptions) -> Tracker:
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


def run_sequential(jobs: list[Job], settings: ExecutorSettings, on_event: OnEvent) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per run would break up the sweep's own
    dev = pick_device(settings.device)
    for job in jobs:
        on_event(Started(job))

        def on_step(step, total, reward, eval):
            on_event(Stepped(job, step, reward, eval))

        if own_process_needed(job.cfg, dev):  # no per-step progress from the child: the bar moves when it ends
            summary = in_own_process(run_one, job.cfg, job.run_dir, dev, None, job.options)
        else:
            summary = run_one(job.cfg, job.run_dir, dev, on_step, job.options)
        on_event(Ended(job, summary))


def execute(jobs: list[Job], settings: ExecutorSettings, on_event: OnEvent) -> None:
    EXECUTORS.get(settings.executor)(jobs, settings, on_event)


# --- shared by the executors that run each job in a process of its own (local, ray)

def report_step(job: Job, seen: dict[Path, int], on_event: OnEvent) -> None:
    """A Stepped event from metrics.jsonl when the run logged a step since the last look (`seen`):
    how a parent follows a child's progress without repeating itself."""
    rows = read_metrics(job.run_dir)
    last = rows[-1] if rows else {"step": 0}
    if seen.get(job.run_dir) != last["step"]:
        seen[job.run_dir] = last["step"]
        on_event(Stepped(job, last["step"], last.get("reward/mean"), last.get("eval/reward")))


def record_lost(job: Job, status: str, error: str) -> dict:
    """summary.json for a run whose process died without writing one (killed, segfault, OOM killer)."""
    rows = read_metrics(job.run_dir)
    truncate_logs(job.run_dir, max((r["step"] for r in rows), default=-1))  # the line it died writing is not damage
    summary = {"run_id": job.cfg.run_id, "status": status, "error": error, "memory_estimate": job.options.memory_estimate}
    summary |= summarize_metrics(rows)
    write_json_atomic(job.run_dir / "summary.json", summary)
    return summary
