"""The results layout, the contract between run, verdict and report.

results/<matrix>/<run_id>/{config.json, env.json, metrics.jsonl, samples.jsonl, summary.json, adapter/}
A run with summary.json is finished and never run again; one without is resumed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, obj: Any) -> None:
    """tmp + fsync + rename: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_metrics(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    """Rows of metrics.jsonl (or another JSONL log); a torn last line (the process died mid-write) is dropped."""
    path = run_dir / name
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def read_samples(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir, "samples.jsonl")


def truncate_logs(run_dir: Path, last_step: int) -> None:
    """Keep rows up to `last_step` (the resume point), so a resumed run appends no duplicates."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        _truncate(run_dir, name, last_step)


def _truncate(run_dir: Path, name: str, last_step: int) -> None:
    rows = [r for r in read_metrics(run_dir, name) if r["step"] <= last_step]
    path = run_dir / name
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").exists()


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def summarize_metrics(rows: list[dict]) -> dict:
    """The numbers a reader wants first, derived from metrics rows (verdicts re-derive their own)."""
    evals = [(r["step"], r["eval/reward"]) for r in rows if "eval/reward" in r]
    steps = [r for r in rows if r["step"] > 0]
    step_times = sorted(r["time/rollout_s"] + r["time/train_s"] for r in steps if "time/train_s" in r)
    peaks = [r["memory/peak_gib"] for r in steps if "memory/peak_gib" in r]
    return {
        "steps_completed": max((r["step"] for r in rows), default=0),
        "eval_start": evals[0][1] if evals and evals[0][0] == 0 else None,
        "eval_end": evals[-1][1] if evals and evals[-1][0] > 0 else None,
        "peak_memory_gib": max(peaks, default=None),
        "median_step_s": step_times[len(step_times) // 2] if step_times else None,
    }
