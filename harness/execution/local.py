"""The `local` executor: every run in a process of its own (`python -m harness.execution.worker`), one per
slot at a time. A slot is a visible GPU (the run sees only it, through CUDA_VISIBLE_DEVICES), one of
`--runs-per-gpu N` on it, or on CPU one of `--jobs N`; each run gets its share of the cores
(execution.packing says how slots are laid out).

A run that raises records itself (run_one); one whose process dies (SIGKILL, the OOM killer, a
segfault in a kernel) is recorded here from its exit, with the tail of its worker.log, and the
sweep goes on. Ctrl-C (or SIGTERM) stops every run without a summary, so the same command
resumes them from their checkpoints.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager

from harness.common.files import write_json_atomic
from harness.execution.events import Ended, Note, OnEvent, Started, Stopped
from harness.execution.isolation import allocator_env
from harness.execution.jobs import ExecutorSettings, Job
from harness.execution.lifecycle import record_lost, report_step
from harness.execution.packing import Slot, describe, slots
from harness.execution.worker import job_payload
from harness.results.layout import read_json

POLL_S = 0.5
STOP_GRACE_S = 60  # a stopped run closes its rollout engine (a vLLM server) before it exits


def run_local(jobs: list[Job], settings: ExecutorSettings, on_event: OnEvent) -> None:
    free, queue = slots(settings), list(jobs)
    running: dict[subprocess.Popen, tuple[Job, Slot]] = {}
    seen: dict = {}  # run folder -> the last step reported
    if len(free) > 1:
        on_event(Note(f"{describe(free)}; each run's output goes to its worker.log"))
    with _sigterm_as_interrupt():
        try:
            while queue or running:
                while queue and free:
                    job, slot = queue.pop(0), _least_shared(free, running)
                    free.remove(slot)
                    running[_start(job, slot)] = (job, slot)
                    on_event(Started(job))
                time.sleep(POLL_S)
                for proc, (job, slot) in list(running.items()):
                    report_step(job, seen, on_event)
                    if proc.poll() is None:
                        continue
                    del running[proc]
                    free.append(slot)
                    on_event(_outcome(job, proc.returncode))
        except KeyboardInterrupt:
            _stop(running, on_event)
            raise


def _least_shared(free: list[Slot], running: dict) -> Slot:
    """The free slot on the GPU running the fewest runs (packed runs spread over the GPUs first); on CPU the first."""
    busy = Counter(slot.env.get("CUDA_VISIBLE_DEVICES") for _, slot in running.values())
    return min(free, key=lambda slot: busy[slot.env.get("CUDA_VISIBLE_DEVICES")])


def _start(job: Job, slot: Slot) -> subprocess.Popen:
    job.run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(job.run_dir / "job.json", job_payload(job, slot.device))
    with open(job.run_dir / "worker.log", "ab") as log:
        # its own session: the terminal's Ctrl-C reaches this process only, which stops runs in order
        return subprocess.Popen([sys.executable, "-m", "harness.execution.worker", str(job.run_dir)], stdout=log,
                                stderr=subprocess.STDOUT, env=worker_env(job, slot), start_new_session=True)


def worker_env(job: Job, slot: Slot) -> dict[str, str]:
    """The run's process's environment: this one's, the slot's (its GPU, threads) and its CUDA allocator setting."""
    return os.environ | slot.env | allocator_env(job.cfg, slot.device) | {"QRL_PARENT_PID": str(os.getpid())}


def _outcome(job: Job, code: int) -> Ended | Stopped:
    summary_path = job.run_dir / "summary.json"
    if summary_path.exists():
        return Ended(job, read_json(summary_path))
    if code == 130:  # stopped from outside (SIGINT/SIGTERM to the run itself): resumable, like Ctrl-C
        return Stopped(job)
    tail = _log_tail(job)
    if code < 0:
        name = signal.Signals(-code).name
        why = " (the kernel's OOM killer sends SIGKILL: see `dmesg`)" if -code == signal.SIGKILL else ""
        summary = record_lost(job, "killed", f"the run's process was killed by {name}{why}; worker.log ends: {tail}")
    else:
        summary = record_lost(job, "failed", f"the run's process exited with code {code}; worker.log ends: {tail}")
    return Ended(job, summary)


def _log_tail(job: Job, lines: int = 5) -> str:
    path = job.run_dir / "worker.log"
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(text[-lines:]) or "(empty)"


def _stop(running: dict, on_event: OnEvent) -> None:
    """SIGTERM to every run (it stops without a summary, closing its engine), then SIGKILL to the
    ones still there after STOP_GRACE_S or a second Ctrl-C."""
    if not running:
        return
    on_event(Note(f"stopping {len(running)} run(s) (Ctrl-C again to kill them now) ...", warn=True))
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.time() + STOP_GRACE_S
    try:
        while any(p.poll() is None for p in running) and time.time() < deadline:
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    for proc in running:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the group: a vLLM server the run started goes too
            proc.wait()


@contextmanager
def _sigterm_as_interrupt():
    """A scheduler's SIGTERM stops the sweep the way Ctrl-C does, instead of killing it outright."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
