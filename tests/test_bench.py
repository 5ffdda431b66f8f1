"""The benchmark's own accounting: exclusive times (a call's timed children are not counted twice)."""

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import overhead  # noqa: E402


def test_exclusive_timer_subtracts_nested_calls(monkeypatch):
    clock = iter(range(100))  # each perf_counter() call is one second later
    monkeypatch.setattr(overhead.time, "perf_counter", lambda: next(clock))
    timer = overhead.ExclusiveTimer(cuda=False)
    inner = timer.wrap("forward", lambda: next(clock))  # 2 s inside: start, body tick, end
    outer = timer.wrap("generate", lambda: [inner(), inner(), next(clock)])
    outer()
    # forward: 2 calls x (end - start = 2); generate: (end - start = 8) - 4 spent in forward
    assert timer.totals == {"forward": 4, "generate": 4}
