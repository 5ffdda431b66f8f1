"""Trackers: log(metrics, step), log_config(config), finish(summary).

The JSONL tracker always runs and is the source of truth for verdicts; others mirror it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

from harness.common.files import write_json_atomic


class Tracker(Protocol):
    def log_config(self, config: dict) -> None: ...
    def log(self, metrics: dict, step: int) -> None: ...
    def log_samples(self, samples: list[dict], step: int) -> None: ...
    def finish(self, summary: dict) -> None: ...


class JsonlTracker:
    """metrics.jsonl appended and fsynced per step, samples.jsonl likewise; summary.json written
    atomically, last."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a")
        self._samples = open(run_dir / "samples.jsonl", "a")

    def log_config(self, config: dict) -> None:
        write_json_atomic(self.run_dir / "config.json", config)

    def log(self, metrics: dict, step: int) -> None:
        _append(self._file, {"step": step, **metrics})

    def log_samples(self, samples: list[dict], step: int) -> None:
        """A few (prompt, completion, reward) rows, so a report can show what the model wrote."""
        _append(self._samples, {"step": step, "samples": samples})

    def finish(self, summary: dict) -> None:
        self._file.close()
        self._samples.close()
        write_json_atomic(self.run_dir / "summary.json", summary)


class Trackers:
    """Several trackers as one, called in order: the JSONL tracker goes last, so its summary.json
    (the mark of a finished run) is written after every mirror has finished."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log_config(self, config: dict) -> None:
        for t in self.trackers:
            t.log_config(config)

    def log(self, metrics: dict, step: int) -> None:
        for t in self.trackers:
            t.log(metrics, step)

    def log_samples(self, samples: list[dict], step: int) -> None:
        for t in self.trackers:
            t.log_samples(samples, step)

    def finish(self, summary: dict) -> None:
        for t in self.trackers:
            t.finish(summary)


def _append(f, row: dict) -> None:
    f.write(json.dumps(row) + "\n")
    f.flush()
    os.fsync(f.fileno())
