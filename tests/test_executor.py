import os

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
