"""Several runs on one GPU (--runs-per-gpu N or auto): the local executor's slots and their threads, how
auto decides from the memory-fit estimates, the pre-check's share of a packed GPU, Ray's fractional GPU
request (tests/test_executor_ray.py), the options' validation, and progress bars with more runs than fit
on a screen.

This machine has no GPU: where a test needs GPUs to exist it fakes torch.cuda.device_count, as
test_executor_local does; nothing here starts a run on a GPU."""

import pytest
import torch

from harness.execution.jobs import ExecutorSettings, Job
from harness.execution.packing import (
    auto_runs_per_gpu,
    cpu_slots,
    gpu_slots,
    resolve,
    shared_by,
    slots,
    usable_cores,
)

from conftest import tiny_run_config


def layout(free) -> list[tuple[str, str, str]]:
    return [(s.env["CUDA_VISIBLE_DEVICES"], s.env["OMP_NUM_THREADS"], s.env["QRL_RUNS_PER_GPU"]) for s in free]


def test_gpu_slots_are_dealt_round_robin_and_share_the_cores():
    # 2 GPUs x 3 runs = 6 at a time on 16 cores: 16 // 6 = 2 threads each; GPU 0, 1, 0, 1, ...
    assert layout(gpu_slots(["0", "1"], 3, 16)) == [("0", "2", "3"), ("1", "2", "3")] * 3
    # --jobs 3 cuts the deal: GPU 0 gets two runs, GPU 1 one; 16 // 3 = 5 threads
    assert layout(gpu_slots(["0", "1"], 3, 16, jobs=3)) == [("0", "5", "2"), ("1", "5", "1"), ("0", "5", "2")]
    # more runs than cores: each still gets a thread
    assert layout(gpu_slots(["GPU-a"], 6, 4)) == [("GPU-a", "1", "6")] * 6
    # one run per GPU, as before packing, now with its share of the cores: 8 GPUs on 128 cores
    assert {x[1:] for x in layout(gpu_slots([str(i) for i in range(8)], 1, 128))} == {("16", "1")}
    assert all(s.device == "cuda" for s in gpu_slots(["0"], 2, 8))
    assert [s.env for s in cpu_slots(3, 16)] == [{"OMP_NUM_THREADS": "5"}] * 3


def test_a_run_takes_a_free_slot_on_the_least_busy_gpu_and_the_sweep_says_how_runs_are_laid_out():
    from harness.execution.local import _least_shared
    from harness.execution.packing import describe

    free = gpu_slots(["0", "1"], 2, 8)  # 0, 1, 0, 1
    running = {"a": (None, free[0]), "b": (None, free[2])}  # GPU 0's two slots are taken
    assert _least_shared([free[0], free[1]], {"a": (None, free[0])}).env["CUDA_VISIBLE_DEVICES"] == "1"
    assert _least_shared([free[1], free[3]], running) is free[1]
    assert describe(free) == "4 runs at a time: 2 per GPU on 2 GPU(s) (0, 1), 2 CPU threads each"
    assert describe(gpu_slots(["0", "1"], 1, 8)) == "2 runs at a time: one per GPU on 2 GPU(s) (0, 1), 4 CPU threads each"
    assert describe(cpu_slots(2, 8)) == "2 runs at a time on the CPU, 4 threads each"


def test_slots_on_a_faked_gpu_host(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # a fake: this machine has no GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-b")
    cores = usable_cores()
    threads = str(max(1, cores // 4))
    assert layout(slots(ExecutorSettings(device="cuda", runs_per_gpu=2))) == [
        ("3", threads, "2"), ("GPU-b", threads, "2"), ("3", threads, "2"), ("GPU-b", threads, "2")]
    assert len(slots(ExecutorSettings(device="cuda:1", runs_per_gpu=3))) == 3
    assert len(slots(ExecutorSettings(device="cuda", runs_per_gpu="auto"))) == 2  # not resolved yet: one each


def test_auto_packs_what_the_largest_estimate_allows_within_the_cores_and_runs():
    # tiny runs (0.93 GiB with the CUDA context) on an H200: memory allows floor(140 x 0.8 / 0.93) = 120, 16 cores 16
    n, why = auto_runs_per_gpu([0.93] * 100, 140.0, gpus=1, cores=16)
    assert n == 16 and "16 cores" in why
    # the largest estimate decides: floor(140 x 0.8 / 30) = 3
    n, why = auto_runs_per_gpu([10.0, 30.0] * 5, 140.0, gpus=1, cores=64)
    assert n == 3 and "30.00 GiB" in why
    # never more per GPU than there are runs: 8 runs over 4 GPUs is 2 each; --jobs 2 over 2 GPUs is 1 each
    assert auto_runs_per_gpu([1.0] * 8, 140.0, gpus=4, cores=128)[0] == 2
    assert auto_runs_per_gpu([1.0] * 10, 140.0, gpus=2, cores=128, jobs=2)[0] == 1
    # a run that cannot fit even alone is the pre-check's (infeasible), not a reason to pack less
    assert auto_runs_per_gpu([200.0, 1.0, 1.0, 1.0], 140.0, gpus=1, cores=8)[0] == 3
    # a run above 80% of the GPU runs alone
    assert auto_runs_per_gpu([120.0, 1.0], 140.0, gpus=1, cores=8)[0] == 1
    # an estimate that could not be made: nobody is packed beside that run
    n, why = auto_runs_per_gpu([1.0, None], 140.0, gpus=1, cores=8)
    assert n == 1 and "could not be estimated" in why
    # Ray: no core limit here (num_cpus=1 per task limits them on the cluster)
    assert auto_runs_per_gpu([1.0] * 50, 20.0) == (16, "the largest estimate, 1.00 GiB, fits 20.0 GiB x 0.8 that often")


def test_auto_resolves_from_the_real_estimates(tmp_path, tiny_model, monkeypatch):
    """The tiny model's estimate on a GPU (no GPU needed to make it): auto over a faked one-GPU host."""
    from harness.execution.memory_fit import estimate

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cuda = torch.device("cuda")
    jobs = [Job(tiny_run_config(), tmp_path / str(s)) for s in range(5)]
    fit = estimate(jobs[0].cfg, cuda)["fit_gib"]
    capacity = 4 * fit  # 0.8 x 4 fits = room for 3
    chosen, note = resolve(ExecutorSettings(device="cuda", runs_per_gpu="auto"), jobs, cuda, capacity)
    assert chosen.runs_per_gpu == min(3, usable_cores()) and note.startswith(f"runs per GPU auto: {chosen.runs_per_gpu}")
    assert shared_by(chosen, cuda) == chosen.runs_per_gpu
    # a number is kept; auto where the pre-check's device is a CPU has nothing to pack
    assert resolve(ExecutorSettings(runs_per_gpu=5), jobs, cuda, capacity) == (ExecutorSettings(runs_per_gpu=5), None)
    assert resolve(ExecutorSettings(runs_per_gpu="auto"), jobs, torch.device("cpu"), capacity)[0].runs_per_gpu == 1
    ray, _ = resolve(ExecutorSettings(executor="ray", runs_per_gpu="auto"), jobs, cuda, capacity)
    assert ray.runs_per_gpu == 3  # no local core limit for a cluster


def test_runs_sharing_a_device_divide_its_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert shared_by(ExecutorSettings(device="cuda", runs_per_gpu=3), cuda) == 3
    assert shared_by(ExecutorSettings(device="cuda", runs_per_gpu=3, jobs=3), cuda) == 2  # 2 on GPU 0, 1 on GPU 1
    assert shared_by(ExecutorSettings(device="cuda"), cuda) == 1
    assert shared_by(ExecutorSettings(executor="ray", runs_per_gpu=4), cuda) == 4
    assert shared_by(ExecutorSettings(device="cpu", jobs=4), cpu) == 4
    assert shared_by(ExecutorSettings(executor="ray"), cpu) == 1


def test_a_packed_run_that_cannot_fit_its_share_is_infeasible_not_launched(tmp_path, tiny_model, monkeypatch):
    """Through harness.execute on a faked one-GPU host: 4 runs per GPU give each a quarter of --memory-gib,
    less than the tiny run's estimate, so nothing is launched (nothing trains on the GPU this machine lacks)."""
    import harness
    from harness.execution.events import Infeasible
    from harness.execution.memory_fit import estimate
    from harness.results.layout import read_json

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    job = harness.api.job(tiny_run_config(), tmp_path / "results", "packed")
    fit = estimate(job.cfg, torch.device("cuda"))["fit_gib"]
    events = []
    launched = harness.execute([job], harness.settings(device="cuda", runs_per_gpu=4), memory_gib=2 * fit,
                               on_event=events.append)
    assert launched == []
    assert [type(e) for e in events if isinstance(e, Infeasible)] == [Infeasible]
    summary = read_json(job.run_dir / "summary.json")
    assert summary["status"] == "infeasible" and summary["shared_by"] == 4
    assert summary["capacity_gib"] == pytest.approx(fit / 2)
    assert "shared by 4 runs at a time: fewer with --runs-per-gpu" in summary["error"]


@pytest.mark.parametrize(("args", "says"), [
    (["--runs-per-gpu", "0"], "--runs-per-gpu '0': give a whole number >= 1 of runs sharing each GPU, or auto"),
    (["--runs-per-gpu", "lots"], "--runs-per-gpu 'lots': give a whole number >= 1"),
    (["--runs-per-gpu", "2", "--device", "cpu"], "--runs-per-gpu 2: --device cpu has no GPU to share"),
    (["--runs-per-gpu", "auto", "--device", "cpu"], "on CPU, --jobs N"),
    (["--runs-per-gpu", "2", "--executor", "sequential"], "the sequential executor runs one run at a time"),
    (["--runs-per-gpu", "2"], "sees no CUDA GPU here; on CPU, --jobs N"),  # this machine: device auto is its CPU
])
def test_cli_refuses_runs_per_gpu_it_cannot_honour(tmp_path, args, says):
    from typer.testing import CliRunner

    from harness.cli import app

    (tmp_path / "m.yaml").write_text("base: {train: {steps: 2}}\nseeds: [0]\n")
    out = CliRunner().invoke(app, ["sweep", str(tmp_path / "m.yaml"), "--results", str(tmp_path / "r"), *args])
    assert out.exit_code == 2 and says in " ".join(out.output.split()), out.output
    assert not (tmp_path / "r").exists()


def test_python_settings_take_a_number_its_digits_or_auto():
    import harness
    from harness.errors import UsageError

    assert harness.settings(runs_per_gpu="3", check_device=False).runs_per_gpu == 3
    assert harness.settings(runs_per_gpu="AUTO", check_device=False).runs_per_gpu == "auto"
    assert harness.settings(device="cpu", runs_per_gpu=1).runs_per_gpu == 1  # harmless
    assert harness.settings(runs_per_gpu="auto").runs_per_gpu == "auto"  # a CPU-only machine: nothing to pack, no error
    for bad in (0, -1, True, 1.5, "2.5"):
        with pytest.raises(UsageError, match="runs_per_gpu"):
            harness.settings(runs_per_gpu=bad, check_device=False)


def test_progress_shows_a_bar_for_the_first_runs_and_counts_the_others(tmp_path):
    """32 runs packed on a few GPUs (or queued on Ray): 16 bars, the overall bar counts the rest, and a
    run that ends gives its bar to the next one waiting for one."""
    from rich.console import Console

    from harness.config.run import RunConfig
    from harness.execution.events import Ended, Planned, Started
    from harness.execution.progress import MAX_RUN_BARS, RichProgress

    jobs = [Job(RunConfig(seed=s), tmp_path / str(s)) for s in range(2 * MAX_RUN_BARS)]
    console = Console(record=True, width=300)
    with RichProgress(console) as show:
        show(Planned("m", len(jobs), len(jobs)))
        for job in jobs:
            show(Started(job))
        visible = lambda: [t.description.strip() for t in show.bar.tasks[1:] if t.visible]  # noqa: E731
        assert visible() == [j.label for j in jobs[:MAX_RUN_BARS]]
        assert show.bar.tasks[0].fields["info"] == f"+{MAX_RUN_BARS} started runs without a bar"
        show(Ended(jobs[0], {"status": "ok", "wall_s": 3}))
        assert visible() == [j.label for j in jobs[1:MAX_RUN_BARS + 1]]
        assert show.bar.tasks[0].fields["info"] == f"+{MAX_RUN_BARS - 1} started runs without a bar"
