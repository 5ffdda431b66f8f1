"""Two sweeps of one matrix side by side (before and after a library upgrade, CPU and GPU, ...):
which cells changed status, and how far their evidence moved."""

from __future__ import annotations

from dataclasses import dataclass

from harness.common.numbers import median
from harness.results.verdict import CellVerdict


@dataclass
class CellChange:
    name: str
    status_a: str | None  # None: the cell is not in that sweep
    status_b: str | None
    final_a: float | None = None
    final_b: float | None = None
    memory_a: float | None = None
    memory_b: float | None = None
    step_s_a: float | None = None
    step_s_b: float | None = None

    @property
    def changed(self) -> bool:
        return self.status_a != self.status_b


def compare(a: list[CellVerdict], b: list[CellVerdict]) -> list[CellChange]:
    """Cells of both sweeps, matched by name; changed statuses first."""
    by_a, by_b = {c.name: c for c in a}, {c.name: c for c in b}
    out = []
    for name in list(by_a) + [n for n in by_b if n not in by_a]:
        ca, cb = by_a.get(name), by_b.get(name)
        change = CellChange(name, ca.status if ca else None, cb.status if cb else None)
        for side, cell in (("a", ca), ("b", cb)):
            if cell:
                setattr(change, f"final_{side}", cell.eval_final_mean)
                setattr(change, f"memory_{side}", max(cell.stat("peak_memory_gib"), default=None))
                setattr(change, f"step_s_{side}", median(cell.stat("median_step_s")))
        out.append(change)
    return sorted(out, key=lambda c: not c.changed)
