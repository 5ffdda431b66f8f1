"""Trackers: log(metrics, step), log_config(config), finish(summary).

The JSONL tracker always runs and is the source of truth for verdicts; others mirror it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

from harness.results import write_json_atomic


class Tracker(Protocol):
    def log_config(self, config: dict) -> None: ...
    def log(self, metrics: dict, step: int) -> None: ...
    def finish(self, summary: dict) -> None: ...


class JsonlTracker:
    """metrics.jsonl appended and fsynced per step; summary.json written atomically, last."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a")

    def log_config(self, config: dict) -> None:
        write_json_atomic(self.run_dir / "config.json", config)

    def log(self, metrics: dict, step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def finish(self, summary: dict) -> None:
        self._file.close()
        write_json_atomic(self.run_dir / "summary.json", summary)
