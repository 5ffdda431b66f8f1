"""The `ray` executor: every run a Ray task on an existing cluster (`--ray-address auto` finds the
one `ray start --head` started on this machine; or give host:port), one GPU each where the
cluster has GPUs (1/N of one with `--runs-per-gpu N`: Ray then starts N runs on each GPU), and
one CPU each.

Each task runs in a fresh worker process (max_calls=1: no CUDA or vLLM state carried between
runs) and writes into the sweep's results folder when it can see it (a shared filesystem: the
task looks for a marker file the driver wrote there). A node that cannot see it trains in a
temporary folder, starting from the run's last checkpoint sent along, and sends the folder back
to be unpacked in place: the results layout and resume work the same either way.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from harness.common.files import write_json_atomic
from harness.common.system import allocator_settings
from harness.execution.events import Ended, Note, OnEvent, Started
from harness.execution.isolation import allocator_env
from harness.execution.jobs import ExecutorSettings, Job
from harness.execution.lifecycle import record_lost, report_step
from harness.execution.packing import per_gpu
from harness.execution.worker import job_payload
from harness.results.layout import read_json

POLL_S = 0.5
STOP_GRACE_S = 60


def run_ray(jobs: list[Job], settings: ExecutorSettings, on_event: OnEvent) -> None:
    try:
        import ray
    except ImportError:
        raise RuntimeError("the ray executor needs Ray: pip install 'quant-rl-harness[ray]'") from None
    try:
        ray.init(address=settings.ray_address, runtime_env={"env_vars": job_env()}, logging_level="ERROR", log_to_driver=False)
    except ConnectionError as e:
        raise RuntimeError(f"no Ray cluster at --ray-address {settings.ray_address}: start one with `ray start --head` "
                           f"(or pass host:port of an existing one): {e}") from None
    root = jobs[0].run_dir.parent
    marker = root / f".ray-{uuid.uuid4().hex}"
    marker.write_text("the sweep's results folder, as a Ray task sees it\n")
    try:
        gpus = 0 if settings.device == "cpu" else ray.cluster_resources().get("GPU", 0)
        resources = task_resources(per_gpu(settings), gpus > 0)
        task = ray.remote(max_calls=1, max_retries=0)(ray_task)
        device = "cuda" if gpus else "cpu"
        share = f"{resources['num_gpus']} GPU and one CPU" if 0 < resources["num_gpus"] < 1 else f"one {device.upper()}"
        on_event(Note(f"ray: {ray.cluster_resources().get('CPU', 0):.0f} CPUs, {gpus:.0f} GPUs; {len(jobs)} runs, {share} each"))
        env = {"QRL_RUNS_PER_GPU": str(per_gpu(settings))} if gpus else {}  # recorded in env.json
        _drive(ray, {_task_for(task, resources, job, device).remote(job_payload(job, device) | {"env": env}, str(marker),
                                                         _snapshot(job.run_dir)): job for job in jobs}, on_event)
    finally:
        marker.unlink(missing_ok=True)
        ray.shutdown()


def job_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What every run's worker gets of this process's environment: what a run reads (QRL_, WANDB_, HF_) and the CUDA
    allocator's settings, which then stand for every run (allocator_env adds none over them)."""
    return {k: v for k, v in environ.items() if k.startswith(("QRL_", "WANDB_", "HF_"))} | allocator_settings(environ)


def _task_for(task, resources: dict, job: Job, device: str):
    """The run's task: its resources, and the allocator setting its worker process must start with (torch reads it
    once: ray_task's os.environ.update may come after that); Ray merges these env_vars into the job's."""
    env = allocator_env(job.cfg, device)  # none where the driver's environment sets one, as the local executor
    return task.options(**resources, **({"runtime_env": {"env_vars": env}} if env else {}))


def task_resources(runs_per_gpu: int, cluster_has_gpus: bool) -> dict:
    """What each run's task asks Ray for: a CPU, and a GPU or 1/runs_per_gpu of one. Ray counts fractions to
    0.0001, so the share is rounded down there: N of them never add up to more than one GPU."""
    share = math.floor(10_000 / runs_per_gpu) / 10_000 if runs_per_gpu > 1 else 1
    return {"num_cpus": 1, "num_gpus": share if cluster_has_gpus else 0}


def _drive(ray, refs: dict, on_event: OnEvent) -> None:
    seen: dict = {}  # run folder -> the last step reported
    for job in refs.values():
        on_event(Started(job))  # queued on the cluster: Ray starts them as it has room
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=POLL_S)
            for job in refs.values():
                report_step(job, seen, on_event)
            for ref in ready:
                job = refs.pop(ref)
                on_event(Ended(job, _collect(ray, ref, job)))
    except KeyboardInterrupt:
        _stop(ray, list(refs), on_event)
        raise


def _collect(ray, ref, job: Job) -> dict:
    try:
        out = ray.get(ref)
    except ray.exceptions.TaskCancelledError:
        raise KeyboardInterrupt from None  # cancelled from outside (`ray job stop`, a dashboard): stop like Ctrl-C
    except ray.exceptions.RayError as e:  # the worker process or its node died: there is no summary to read
        if (job.run_dir / "summary.json").exists():
            return read_json(job.run_dir / "summary.json")
        return record_lost(job, "killed", f"the run's Ray task died: {type(e).__name__}: {str(e)[:1500]}")
    if out["folder"] is not None:
        _unpack(out["folder"], job.run_dir)
        write_json_atomic(job.run_dir / "summary.json", out["summary"])  # last, as on a shared filesystem
    return out["summary"]


def _stop(ray, refs: list, on_event: OnEvent) -> None:
    """KeyboardInterrupt inside every running task (the run stops without a summary), then force."""
    if not refs:
        return
    on_event(Note(f"stopping {len(refs)} run(s) ...", warn=True))
    for ref in refs:
        ray.cancel(ref)
    deadline = time.time() + STOP_GRACE_S
    while refs and time.time() < deadline:
        done, refs = ray.wait(refs, num_returns=len(refs), timeout=1)
    for ref in refs:
        ray.cancel(ref, force=True)


def ray_task(payload: dict, marker: str, snapshot: bytes | None) -> dict:
    """Inside the Ray worker: run the job where the results folder is, or in a temporary one."""
    from harness.execution.worker import run_job

    os.environ.update(payload.get("env", {}))  # a fresh worker process per task (max_calls=1): nothing leaks
    if Path(marker).exists():
        return {"summary": run_job(payload), "folder": None}
    with tempfile.TemporaryDirectory(prefix="qrl-ray-") as tmp:
        run_dir = Path(tmp) / Path(payload["run_dir"]).name
        run_dir.mkdir()
        if snapshot:
            _unpack(snapshot, run_dir)
        summary = run_job(payload | {"run_dir": str(run_dir)})
        return {"summary": summary, "folder": _snapshot(run_dir)}


def _snapshot(run_dir: Path) -> bytes | None:
    """A run folder as a gzipped tar (None when there is nothing in it yet)."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(run_dir.iterdir()):
            tar.add(path, arcname=path.name)
    return buf.getvalue()


def _unpack(data: bytes, run_dir: Path) -> None:
    """Everything but summary.json, which the caller writes atomically once the rest is in place."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(run_dir, members=[m for m in tar.getmembers() if m.name != "summary.json"], filter="data")
