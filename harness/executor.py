"""Runs: one run's lifecycle (config, env, metrics, summary even on failure) and the executors
that take a sweep's runs (registries.EXECUTORS)."""

from __future__ import annotations

import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.config import RunConfig
from harness.recipes import NonFinite, Pruned
from harness.registries import ALGORITHMS, EXECUTORS
from harness.results import is_finished, read_json, read_metrics, summarize_metrics, truncate_logs, write_json_atomic
from harness.system import device_name, git_commit, library_versions, pick_device
from harness.tracking import JsonlTracker

Job = tuple[RunConfig, Path]


def run_one(cfg: RunConfig, run_dir: Path, device: torch.device, progress=lambda **kw: None) -> dict:
    """Train one run into run_dir and write its summary.json, whatever happens except Ctrl-C.

    An unfinished run_dir is resumed from its last checkpoint; metric rows logged after that
    checkpoint are dropped first, so the resumed run appends no duplicates.
    """
    from harness import checkpoint

    run_dir.mkdir(parents=True, exist_ok=True)
    truncate_logs(run_dir, checkpoint.saved_step(run_dir))
    env_path = run_dir / "env.json"
    env = read_json(env_path) if env_path.exists() else {}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    env = {"started_at": env.get("started_at", now), "resumed_at": env.get("resumed_at", []) + ([now] if env else []),
           "device": device_name(device), "git_commit": git_commit(), "versions": library_versions()}
    write_json_atomic(env_path, env)

    tracker = JsonlTracker(run_dir)
    tracker.log_config(cfg.model_dump(mode="json"))
    summary = {"run_id": cfg.run_id, "status": "ok", "error": None, "device": env["device"]}
    start = time.time()
    try:
        if cfg.rollout.engine == "vllm":  # checked once per configuration, cached beside the sweep's runs
            from harness.engine_check import require

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
    tracker.finish(summary)
    return summary


def run_sequential(jobs: list[Job], device: str, console: Console, names: dict[str, str]) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per run would break up the sweep's own
    dev = pick_device(device)
    with progress_bar(console) as bar:
        overall = bar.add_task("sweep", total=len(jobs), info="")
        for cfg, run_dir in jobs:
            label = f"{names.get(cfg.run_id, cfg.run_id)} seed={cfg.seed}"
            task = bar.add_task(f"  {label}", total=cfg.train.steps, info="")

            def on_step(step, total, reward, eval):
                bar.update(task, completed=step, info=step_info(reward, eval))

            if own_process_needed(cfg, dev):  # no per-step progress from the child: the bar moves when it ends
                summary = in_own_process(run_one, cfg, run_dir, dev)
            else:
                summary = run_one(cfg, run_dir, dev, on_step)
            bar.remove_task(task)
            bar.advance(overall)
            bar.console.print(_one_line(label, cfg.run_id, summary))


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


def _one_line(label: str, run_id: str, s: dict) -> str:
    if s["status"] != "ok":
        return f"[red]✗[/] {label} [{run_id}] {s['status']}: {s['error']}"
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    return f"[green]✓[/] {label} [{run_id}] eval {fmt(s['eval_start'])} → {fmt(s['eval_end'])} in {s['wall_s']:.0f} s"


def pending(jobs: list[Job]) -> list[Job]:
    return [(cfg, d) for cfg, d in jobs if not is_finished(d)]


def execute(jobs: list[Job], executor: str, device: str, console: Console, names: dict[str, str]) -> None:
    EXECUTORS.get(executor)(jobs, device, console, names)
