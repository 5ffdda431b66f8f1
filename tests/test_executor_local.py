"""The local executor: runs in processes of their own, two at a time; a run that raises and one
killed with SIGKILL are recorded while the others finish; Ctrl-C stops the sweep resumably."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from harness.config.matrix import load_matrix
from harness.results.layout import read_json, read_metrics

from conftest import REPO

FOUR_CELLS = """\
# harness sweep four.yaml --jobs 2
base:
  task: {name: arith, eval_size: 50}
  train: {steps: 4, prompts_per_step: 4, group_size: 4, eval_every: 2, checkpoint_every: 2}
axes: {quant: [bf16, nf4]}
include:
  - {quant: bf16, model: no-such-org/no-such-model, label: raises}   # an HF id, checked when it loads: raises inside the run
  - {quant: bf16, train.steps: 2000, label: killed}                  # SIGKILLed by the test mid-way
"""

TWO_RUNS = """\
base:
  task: {name: arith, eval_size: 50}
  train: {steps: 40, prompts_per_step: 4, group_size: 4, eval_every: 10, checkpoint_every: 5}
axes: {quant: [bf16]}
seeds: [0, 1]
"""


def sweep(tmp_path: Path, name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "harness", "sweep", str(tmp_path / f"{name}.yaml"), "--results", str(tmp_path / "results"),
         "--reports", str(tmp_path / "reports"), "--jobs", "2", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},  # the HF id above fails at once instead of trying the network
        # as a terminal starts it: a test suite run in the background of a non-interactive shell (nohup ... &)
        # inherits SIGINT ignored, and a sweep started so would never see the test's Ctrl-C
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def workers_of(run_dir: Path) -> list[int]:
    """pids of live `python -m harness.execution.worker RUN_DIR` processes."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"harness.execution.worker" in cmdline and str(run_dir).encode() in cmdline:
            found.append(int(proc.name))
    return found


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def test_a_raising_run_and_a_killed_run_are_recorded_while_the_others_finish(tmp_path, tiny_model):
    (tmp_path / "four.yaml").write_text(FOUR_CELLS)
    cells = {c.label or c.name: c.runs[0] for c in load_matrix(tmp_path / "four.yaml").cells}
    root = tmp_path / "results" / "four"
    raises, killed = root / cells["raises"].run_id, root / cells["killed"].run_id

    proc = sweep(tmp_path, "four")
    wait_for(lambda: len(read_metrics(killed)) >= 3 and workers_of(killed), proc)
    pid, = workers_of(killed)
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out

    status = {name: read_json(root / cfg.run_id / "summary.json") for name, cfg in cells.items()}
    assert status["quant=bf16"]["status"] == status["quant=nf4"]["status"] == "ok"
    assert status["quant=nf4"]["steps_completed"] == 4
    s = read_json(raises / "summary.json")
    assert s["status"] == "failed" and "no-such-org/no-such-model" in s["error"], s
    s = read_json(killed / "summary.json")
    assert s["status"] == "killed" and "SIGKILL" in s["error"] and s["steps_completed"] >= 2, s
    assert "Traceback" not in out, out  # each run's output is in its worker.log, not the sweep's
    assert (raises / "worker.log").exists()
    report = (tmp_path / "reports" / "four" / "report.md").read_text()
    assert report.count("**Error**") == 2 and "SIGKILL" in report

    # finished, failed and killed runs all have a summary: with retries off a second sweep runs nothing
    again = sweep(tmp_path, "four", "--max-retries", "0")
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "4 already finished, 0 to run" in out, out
    assert "kept as finished: 1 failed, 1 killed; `--retry failed,killed,oom`" in out, out


def test_ctrl_c_stops_every_run_resumably(tmp_path, tiny_model):
    (tmp_path / "two.yaml").write_text(TWO_RUNS)
    runs = [tmp_path / "results" / "two" / r.run_id for r in load_matrix(tmp_path / "two.yaml").cells[0].runs]

    proc = sweep(tmp_path, "two")
    with killed_on_failure(proc, runs):
        frozen = freeze_when(runs, lambda d: len(read_metrics(d)) >= 7, proc)  # both running at once, past a checkpoint
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground sweep
        for pid in frozen:  # let each run go on only once the sweep's SIGTERM waits for it
            wait_for(lambda pid=pid: signal.SIGTERM in pending_signals(pid), proc)
            os.kill(pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted" in out and "resume" in out
    assert not any((d / "summary.json").exists() for d in runs), "a stopped run must not look finished"
    assert not any(workers_of(d) for d in runs), "the sweep left runs training"

    proc = sweep(tmp_path, "two")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    for d in runs:
        steps = [r["step"] for r in read_metrics(d)]
        assert steps == list(range(41)), [s for s, n in Counter(steps).items() if n > 1]
        assert len(read_json(d / "env.json")["resumed_at"]) == 1, "restarted, not resumed"
        assert read_json(d / "summary.json")["status"] == "ok"


@contextmanager
def killed_on_failure(proc: subprocess.Popen, runs: list[Path]):
    """A failing test leaves no sweep waiting on workers it froze: both are killed."""
    try:
        yield
    except BaseException:
        for pid in [p for d in runs for p in workers_of(d)]:
            os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def state(pid: int) -> str:
    """The process's state letter in /proc (T: stopped); 'X' once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def pending_signals(pid: int) -> set[int]:
    """Signals sent to the process and not yet handled (a stopped process handles them when continued)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return set()
    mask = 0
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            mask |= int(line.split()[1], 16)
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def freeze_when(runs: list[Path], ready, proc: subprocess.Popen, timeout: float = 300) -> list[int]:
    """SIGSTOP each run's worker once `ready(run_dir)` holds, and return their pids when all are stopped.

    Race-free on a busy machine: the condition is read while the worker is stopped, so a run cannot
    finish between the test seeing it mid-way and the test's signal arriving."""
    frozen: dict[Path, int] = {}
    deadline = time.time() + timeout
    while len(frozen) < len(runs):
        for d in runs:
            if d in frozen:
                continue
            for pid in workers_of(d):
                os.kill(pid, signal.SIGSTOP)
                # stopped, not just signalled; or exiting (a zombie, or gone), which a stop never reaches: a run
                # seen only as it ends fails below as one that finished unseen, not as a wait on the sweep
                wait_for(lambda pid=pid: state(pid) in "TtZX", proc)
                if state(pid) in "ZX":
                    continue
                if ready(d):
                    frozen[d] = pid
                else:
                    os.kill(pid, signal.SIGCONT)
        assert proc.poll() is None, proc.stdout.read()
        assert not any((d / "summary.json").exists() for d in runs), "a run finished before the condition was seen"
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)
    return list(frozen.values())


def test_gpu_slots_pin_one_visible_gpu_each(monkeypatch):
    """Slot assignment on a multi-GPU host, without one: each slot's CUDA_VISIBLE_DEVICES names one of the
    GPUs this process may use (ids or UUIDs, as the user listed them); --jobs and cuda:N narrow them."""
    from harness.execution.jobs import ExecutorSettings
    from harness.execution.packing import slots

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)  # a fake: this machine has no GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, GPU-8f1c,5")
    pinned = lambda s: [(x.device, x.env["CUDA_VISIBLE_DEVICES"]) for x in slots(s)]  # noqa: E731
    assert pinned(ExecutorSettings(device="cuda")) == [("cuda", "2"), ("cuda", "GPU-8f1c"), ("cuda", "5")]
    assert pinned(ExecutorSettings(device="cuda", jobs=2)) == [("cuda", "2"), ("cuda", "GPU-8f1c")]
    assert pinned(ExecutorSettings(device="cuda:1")) == [("cuda", "GPU-8f1c")]
    cpu = slots(ExecutorSettings(device="cpu", jobs=2))
    assert len(cpu) == 2 and all(s.device == "cpu" and "CUDA_VISIBLE_DEVICES" not in s.env for s in cpu)


def test_a_gpu_slot_no_run_could_start_on_is_refused_before_the_sweep(monkeypatch, tmp_path):
    """A slot on a GPU that does not exist takes the next queued run each time its run dies, and every
    run of the sweep ends up failed for good; a sweep on a device with no slot at all waits forever."""
    from typer.testing import CliRunner

    from harness.cli import app
    from harness.execution.packing import pinned_gpus

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a fake one-GPU host: CUDA drops "7" and what follows
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,7")
    with pytest.raises(ValueError, match="names 2 GPUs but torch sees 1"):
        pinned_gpus("auto")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa")
    assert pinned_gpus("cuda:0") == ["GPU-aaaa"]
    with pytest.raises(ValueError, match=r"1 GPU\(s\) visible \(GPU-aaaa\), so cuda:0 to cuda:0"):
        pinned_gpus("cuda:3")

    monkeypatch.undo()  # the real CPU-only torch from here
    (tmp_path / "m.yaml").write_text("base: {train: {steps: 2}}\nseeds: [0]\n")
    for device, says in (("cuda", "sees no CUDA GPU"), ("mps", "choose auto, cpu, cuda or cuda:N")):
        out = CliRunner().invoke(app, ["sweep", str(tmp_path / "m.yaml"), "--device", device, "--results", str(tmp_path / "r")])
        assert out.exit_code == 2 and says in out.output, out.output
        assert not (tmp_path / "r").exists()
