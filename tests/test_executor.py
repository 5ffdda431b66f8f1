import os
from pathlib import Path

import pytest
import torch

from harness.config.run import RunConfig
from harness.execution.isolation import in_own_process, own_process_needed


def test_in_own_process_returns_the_childs_result_and_raises_its_errors():
    assert in_own_process(os.getpid) != os.getpid()
    with pytest.raises(ZeroDivisionError):
        in_own_process(divmod, 1, 0)


def test_only_colocated_vllm_on_cuda_gets_its_own_process():
    colocated = RunConfig(rollout={"colocation": "colocated", "quantization": "bf16"})
    assert own_process_needed(colocated, torch.device("cuda"))
    assert not own_process_needed(colocated, torch.device("cpu"))  # vLLM's CPU backend has no CuMem pool
    assert not own_process_needed(RunConfig(rollout={"colocation": "server", "quantization": "bf16"}), torch.device("cuda"))
    assert not own_process_needed(RunConfig(), torch.device("cuda"))


def test_a_runs_console_line_shows_its_id_whatever_it_starts_with(tmp_path):
    """Rich reads "[bead269e9bd2]" as a style tag and silently drops it; a digit-led id survived, so
    the sweep's log named some runs and not others."""
    from rich.console import Console

    from harness.execution.events import Ended
    from harness.execution.jobs import Job
    from harness.execution.progress import RichProgress

    cfg = next(c for c in (RunConfig(seed=s) for s in range(100)) if c.run_id[0].isalpha())
    console = Console(record=True, width=300)
    with RichProgress(console) as show:
        show(Ended(Job(cfg, tmp_path), {"status": "ok", "eval_start": 0.5, "eval_end": 0.75, "wall_s": 3}))
        show(Ended(Job(cfg, tmp_path), {"status": "killed", "error": "by [bold]SIGKILL[/bold]"}))
    ok, killed = console.export_text().splitlines()
    assert f"seed={cfg.seed} [{cfg.run_id}] eval 0.500 → 0.750" in ok
    assert f"[{cfg.run_id}] killed: by [bold]SIGKILL[/bold]" in killed


def test_a_parent_reports_a_childs_step_once_per_new_step(tmp_path):
    """The local and Ray executors poll metrics.jsonl; a poll that finds no new step says nothing."""
    from harness.execution.jobs import Job
    from harness.execution.lifecycle import report_step
    from harness.tracking.files import JsonlTracker

    job, seen, events = Job(RunConfig(), tmp_path), {}, []
    report_step(job, seen, events.append)  # nothing logged yet: step 0
    tracker = JsonlTracker(tmp_path)
    tracker.log({"reward/mean": 0.25}, 1)
    report_step(job, seen, events.append)
    report_step(job, seen, events.append)
    tracker.log({"reward/mean": 0.5, "eval/reward": 0.75}, 2)
    report_step(job, seen, events.append)
    assert [(e.step, e.reward, e.eval) for e in events] == [(0, None, None), (1, 0.25, None), (2, 0.5, 0.75)]


def test_a_run_stopped_from_outside_leaves_the_bars_and_says_so(tmp_path):
    """Exit 130 without a summary: its bar goes, the sweep's bar advances, a line says it resumes."""
    from rich.console import Console

    from harness.execution.events import Planned, Started, Stopped
    from harness.execution.jobs import Job
    from harness.execution.progress import RichProgress

    job = Job(RunConfig(), tmp_path)
    console = Console(record=True, width=300)
    with RichProgress(console) as show:
        show(Planned("m", 1, 1))
        show(Started(job))
        assert len(show.bar.tasks) == 2
        show(Stopped(job))
        assert show.runs == {} and [t.completed for t in show.bar.tasks] == [1]
    assert f"■ {job.label} [{job.cfg.run_id}] stopped before it finished; the next sweep resumes it" in console.export_text()


def test_a_run_generating_in_process_on_a_gpu_starts_with_expandable_segments(no_allocator_setting):
    """The local executor's worker environment: expandable segments for an in-process run on a GPU slot only, and
    never over the user's own allocator setting (which the worker inherits as it is)."""
    from harness.execution.isolation import allocator_env
    from harness.execution.jobs import Job
    from harness.execution.local import worker_env
    from harness.execution.packing import Slot

    gpu, cpu = Slot("cuda", {"CUDA_VISIBLE_DEVICES": "1"}), Slot("cpu", {"OMP_NUM_THREADS": "2"})
    in_process = Job(RunConfig(), Path("r"))
    alloc = lambda job, slot: worker_env(job, slot).get("PYTORCH_CUDA_ALLOC_CONF")  # noqa: E731
    assert alloc(in_process, gpu) == "expandable_segments:True"
    assert worker_env(in_process, gpu)["CUDA_VISIBLE_DEVICES"] == "1"
    assert alloc(in_process, cpu) is None
    for colocation in ("colocated", "server"):  # vLLM's sleep-mode allocator refuses expandable segments
        assert alloc(Job(RunConfig(rollout={"colocation": colocation, "quantization": "bf16"}), Path("r")), gpu) is None
    no_allocator_setting.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert alloc(in_process, gpu) == "max_split_size_mb:512"
    assert allocator_env(RunConfig(), "cuda", {"PYTORCH_ALLOC_CONF": "garbage_collection_threshold:0.8"}) == {}
    assert allocator_env(RunConfig(), "cuda:1", {}) == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
