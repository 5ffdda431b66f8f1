"""Tests that kill or interrupt a subprocess wait for an event, never for the clock.

`wait_until` polls a condition on what the process wrote (a metrics row, a checkpoint); its
deadline only turns a hang into a failure. `freeze` stops a process (SIGSTOP) and returns once
the kernel says it is stopped, so what the test then reads about it (is the run still mid-way?)
cannot change before the test's next signal lands: a kill can no longer race the run's end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 600, every: float = 0.05) -> None:
    """Poll `condition()` until it holds; fail at once if `proc` exits first (with its output)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}:\n"
                                 f"{proc.stdout.read() if proc.stdout else ''}")
        assert time.monotonic() < deadline, f"no sign after {timeout:.0f} s of {what}: hung?"
        time.sleep(every)


def state(pid: int) -> str:
    """The process's state letter in /proc (T: stopped, Z: exited); 'X' once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def freeze(pids: list[int], group: bool = False) -> None:
    """SIGSTOP each process (each process group with `group`) and wait until each one is stopped."""
    for pid in pids:
        (os.killpg if group else os.kill)(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 60
    while not all(state(pid) in "TtZX" for pid in pids):
        assert time.monotonic() < deadline, f"SIGSTOP did not stop {pids}"
        time.sleep(0.01)


def gone(pid: int, timeout: float = 120) -> None:
    """Wait until the process has exited (a zombie counts: its parent is not the test)."""
    deadline = time.monotonic() + timeout
    while state(pid) not in "ZX":
        assert time.monotonic() < deadline, f"process {pid} is still there after {timeout:.0f} s"
        time.sleep(0.05)


def pids_with(arg: str) -> list[int]:
    """pids of the live processes with `arg` as one of their command-line arguments."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arg.encode() in cmdline and state(int(proc.name)) not in "ZX":
            found.append(int(proc.name))
    return found
