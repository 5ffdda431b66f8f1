"""Child processes that must not outlive the process that started them."""

from __future__ import annotations

import ctypes
import os
import signal


def die_with_parent(parent: int | None = None) -> None:
    """Linux: this process gets SIGTERM when its parent dies (PR_SET_PDEATHSIG), instead of running on
    unattended; elsewhere nothing. `parent`: the pid it was started by; KeyboardInterrupt when that one
    died before this took effect. Also a Popen preexec_fn (no argument)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:  # it died before prctl took effect
        raise KeyboardInterrupt
