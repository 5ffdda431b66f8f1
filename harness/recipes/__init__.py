"""One module per algorithm, readable top to bottom. Each exposes run(cfg, run_dir, tracker, device, progress),
a Recipe (registries.ALGORITHMS). Imports nothing heavy: the registry imports this package."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from harness.config.run import RunConfig
    from harness.tracking.files import Tracker


@runtime_checkable
class Recipe(Protocol):
    """A recipe module's `run`: train `cfg` into run_dir, logging through `tracker`; progress(step=, total=, reward=,
    eval=) after each step. Returns the run's summary fields (merged into summary.json). Raises NonFinite on
    divergence and Pruned when `progress` stops it."""

    def __call__(self, cfg: RunConfig, run_dir: Path, tracker: Tracker, device: torch.device,
                 progress: Callable[..., None]) -> dict: ...


class NonFinite(RuntimeError):
    """A loss or gradient became NaN/inf: the run stops and is recorded as diverged."""


class Pruned(Exception):
    """The caller (a tuning study's pruner) stopped the run early: recorded as pruned, not failed."""
