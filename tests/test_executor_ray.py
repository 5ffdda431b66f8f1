"""The Ray executor against a real local Ray cluster (`ray start --head`, loopback only)."""

import shutil
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from harness.config.matrix import load_matrix
from harness.results.layout import read_json, read_metrics
from harness.tracking.wandb import WandbSettings, recorded_step, wandb_run_id

from conftest import REPO, tiny_run_config

MATRIX = """\
base:
  task: {name: arith, eval_size: 50}
  train: {steps: 3, prompts_per_step: 4, group_size: 4, eval_every: 3, checkpoint_every: 3}
axes: {quant: [bf16, nf4]}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster():
    """A head node on 127.0.0.1 with 2 CPUs, stopped with the test (--block: it lives as long as this process)."""
    yield from head_node(gpus=0)


@pytest.fixture
def ray_cluster_one_gpu():
    """The same with one logical GPU (Ray schedules by it; no task here touches a real one)."""
    yield from head_node(gpus=1)


def head_node(gpus: int):
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    port, temp = free_port(), Path(f"/tmp/qrl-ray-{uuid.uuid4().hex[:8]}")  # short: Ray's unix sockets live under it
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2", f"--num-gpus={gpus}",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}", "--object-store-memory=200000000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # ready when it says so (`ray start` prints this once its GCS and raylet are up), rather than asking
    # `ray status` once a second, each a process of its own; the output is kept flowing and for the message
    said, started = [], threading.Event()

    def follow():
        for line in head.stdout:
            said.append(line)
            if "Ray runtime started" in line:
                started.set()
        started.set()  # it exited

    threading.Thread(target=follow, daemon=True).start()
    assert started.wait(timeout=300) and any("Ray runtime started" in line for line in said), (
        "ray head did not start:\n" + "".join(said))
    yield f"127.0.0.1:{port}"
    head.terminate()
    head.wait(timeout=60)
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_executor_runs_a_sweep_on_a_local_cluster(tmp_path, tiny_model, ray_cluster, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "m.yaml").write_text(MATRIX)
    runs = [tmp_path / "results" / "m" / c.runs[0].run_id for c in load_matrix(tmp_path / "m.yaml").cells]
    cmd = [sys.executable, "-m", "harness", "sweep", str(tmp_path / "m.yaml"), "--results", str(tmp_path / "results"),
           "--reports", str(tmp_path / "reports"), "--executor", "ray", "--ray-address", ray_cluster, "--wandb", "offline"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 CPUs, 0 GPUs" in out.stdout
    for d in runs:
        assert read_json(d / "summary.json")["status"] == "ok"
        assert [r["step"] for r in read_metrics(d)] == [0, 1, 2, 3]
        assert (d / "adapter").is_dir()
        # mirrored to W&B offline from inside the Ray task: the steps are in the run's transaction log
        assert recorded_step(d / "wandb", wandb_run_id(d, "m", WandbSettings())) == 3
    assert not list((tmp_path / "results" / "m").glob(".ray-*")), "the marker must not outlive the sweep"
    assert (tmp_path / "reports" / "m" / "report.md").exists()

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "2 already finished, 0 to run" in again.stdout, again.stdout + again.stderr


def test_a_node_without_the_results_folder_sends_the_run_back(tmp_path, tiny_model):
    """What a task does where the driver's marker is not visible (no shared filesystem): it trains in
    a temporary folder and returns it; the driver unpacks it in place. Called directly, no cluster."""
    from harness.execution.jobs import Job
    from harness.execution.ray import _unpack, ray_task
    from harness.execution.worker import job_payload

    cfg = tiny_run_config(steps=2, eval_every=2, checkpoint_every=2)
    run_dir = tmp_path / "results" / cfg.run_id
    out = ray_task(job_payload(Job(cfg, run_dir), "cpu"), str(tmp_path / "not-visible-marker"), None)
    assert not run_dir.exists(), "the task wrote into a folder it was told it cannot see"
    assert out["summary"]["status"] == "ok" and out["folder"]
    _unpack(out["folder"], run_dir)
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2]
    assert (run_dir / "adapter").is_dir() and not (run_dir / "summary.json").exists()  # the driver writes that last


def test_runs_per_gpu_asks_ray_for_a_fraction_of_a_gpu(ray_cluster_one_gpu):
    """--runs-per-gpu N: each run's task asks for 1/N GPU (rounded down to Ray's 0.0001, so N fit on one).
    On a cluster with one logical GPU, two half-GPU tasks as run_ray declares them run at once, both on GPU 0."""
    import ray

    from harness.execution.ray import task_resources

    assert task_resources(1, True) == {"num_cpus": 1, "num_gpus": 1}
    assert task_resources(4, True) == {"num_cpus": 1, "num_gpus": 0.25}
    assert task_resources(3, True) == {"num_cpus": 1, "num_gpus": 0.3333}
    assert all(n * task_resources(n, True)["num_gpus"] <= 1 for n in range(1, 200))
    assert task_resources(4, False) == {"num_cpus": 1, "num_gpus": 0}

    def probe():  # defined here: Ray sends it by value (the worker cannot import a test module)
        import os
        import time

        start = time.time()
        time.sleep(1.0)
        return os.environ.get("CUDA_VISIBLE_DEVICES"), start, time.time()

    ray.init(address=ray_cluster_one_gpu, logging_level="ERROR", log_to_driver=False)
    try:
        task = ray.remote(max_calls=1, max_retries=0)(probe).options(**task_resources(2, True))
        (gpu_a, start_a, end_a), (gpu_b, start_b, end_b) = ray.get([task.remote(), task.remote()], timeout=120)
    finally:
        ray.shutdown()
    assert gpu_a == gpu_b == "0"
    assert start_a < end_b and start_b < end_a, "the two halves of the GPU ran one after the other"


def test_an_in_process_runs_task_starts_with_expandable_segments(ray_cluster, no_allocator_setting):
    """The allocator setting reaches the worker process of an in-process run's task, beside the job's own env_vars
    (Ray merges a task's into them), and not a vLLM run's. A driver that sets its own allocator variable gets it to
    every run (job_env) and no task adds expandable segments over it. "cuda" is the device the executor decides for;
    Ray is asked for no GPU, and no task touches one."""
    import ray

    from harness.config.run import RunConfig
    from harness.execution.jobs import Job
    from harness.execution.ray import _task_for, job_env

    def probe():  # defined here: Ray sends it by value (the worker cannot import a test module)
        import os

        return os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), os.environ.get("PYTORCH_ALLOC_CONF"), os.environ.get("QRL_PROBE")

    def started(jobs: list[Job]) -> list:
        ray.init(address=ray_cluster, runtime_env={"env_vars": job_env()}, logging_level="ERROR", log_to_driver=False)
        try:
            task = ray.remote(max_calls=1, max_retries=0)(probe)
            return ray.get([_task_for(task, {"num_cpus": 1, "num_gpus": 0}, job, "cuda").remote() for job in jobs],
                           timeout=300)
        finally:
            ray.shutdown()

    in_process = Job(tiny_run_config(), Path("r"))
    colocated = Job(RunConfig(rollout={"colocation": "colocated", "quantization": "bf16"}), Path("r"))
    no_allocator_setting.setenv("QRL_PROBE", "job")
    no_allocator_setting.setenv("PATH_PROBE", "not forwarded")
    assert started([in_process, colocated]) == [("expandable_segments:True", None, "job"), (None, None, "job")]
    no_allocator_setting.setenv("PYTORCH_ALLOC_CONF", "garbage_collection_threshold:0.8")
    assert started([in_process]) == [(None, "garbage_collection_threshold:0.8", "job")]
    assert "PATH_PROBE" not in job_env()
