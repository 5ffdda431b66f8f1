"""The results layout, the contract between run, verdict and report.

results/<matrix>/<run_id>/{config.json, env.json, metrics.jsonl, samples.jsonl, summary.json, adapter/, attempts/}
A run with a trustworthy summary.json is finished; one without is resumed. A summary.json that cannot be read, or
that metrics.jsonl contradicts, is damage (`damage`): the run is reopened and resumed like an unfinished one.
Reopening (a damaged run, a retried killed one) moves the old summary.json into attempts/, which keeps the history.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from harness.common.files import write_atomic, write_json_atomic
from harness.errors import HarnessError


class DamagedFile(HarnessError, ValueError):
    """A results file that cannot be read as what it should be; the message names the file."""


def read_json(path: Path) -> Any:
    """The JSON in `path`; DamagedFile (naming it) when it is torn or not JSON, FileNotFoundError when absent."""
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFile(f"{path}: not valid JSON ({e}): a torn or damaged write") from None


def read_metrics(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    """Rows of metrics.jsonl (or another JSONL log) up to the first line that is not a row: a torn last line
    (the process died mid-write) is dropped. `metrics_damage` says whether a finished run's log is whole."""
    return _scan(run_dir / name)[0]


def _scan(path: Path) -> tuple[list[dict], str | None]:
    """(the rows before the first bad line, what is wrong with that line and where; None when every line is a row)."""
    if not path.exists():
        return [], None
    lines = path.read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline that ends the last row
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            return rows, f"{path}: line {i} of {len(lines)} is not a metrics row (a torn or damaged write)"
        rows.append(row)
    return rows, None


def read_samples(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir, "samples.jsonl")


def truncate_logs(run_dir: Path, last_step: int) -> None:
    """Keep rows up to `last_step` (the resume point), so a resumed run appends no duplicates."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        _truncate(run_dir, name, last_step)


def _truncate(run_dir: Path, name: str, last_step: int) -> None:
    rows = [r for r in read_metrics(run_dir, name) if r["step"] <= last_step]
    write_atomic(run_dir / name, "".join(json.dumps(r) + "\n" for r in rows))


def is_finished(run_dir: Path) -> bool:
    return read_summary(run_dir) is not None


def read_summary(run_dir: Path) -> dict | None:
    """The run's summary.json when it exists and can be trusted (`damage` is None), else None."""
    path = run_dir / "summary.json"
    if not path.exists() or damage(run_dir):
        return None
    return read_json(path)


def damage(run_dir: Path) -> str | None:
    """Why a run's summary.json cannot be trusted, naming the file; None when it can (or there is none).

    Damaged: summary.json torn or without a status; metrics.jsonl with a line that is not a row (a torn write,
    or bytes lost in the middle); metrics that end before the steps summary.json says were completed."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    try:
        summary = read_json(path)
    except DamagedFile as e:
        return str(e)
    if not isinstance(summary, dict) or not isinstance(summary.get("status"), str):
        return f"{path}: has no status (not a summary the harness wrote)"
    rows, torn = _scan(run_dir / "metrics.jsonl")
    if torn:
        return torn
    claimed, logged = summary.get("steps_completed"), max((r["step"] for r in rows), default=0)
    if isinstance(claimed, int) and logged < claimed:
        return f"{run_dir / 'metrics.jsonl'}: ends at step {logged}, but {path} says {claimed} steps were completed (rows lost)"
    return None


def reopen(run_dir: Path, why: dict) -> None:
    """Make a finished run pending again: its summary.json (or `why`, when it is unreadable) goes to attempts/N.json."""
    attempts = run_dir / "attempts"
    attempts.mkdir(exist_ok=True)
    n = len(list(attempts.glob("*.json"))) + 1
    write_json_atomic(attempts / f"{n}.json", why)
    (run_dir / "summary.json").unlink(missing_ok=True)


def past_attempts(run_dir: Path) -> list[dict]:
    """The summaries of the run's earlier attempts, oldest first (see `reopen`)."""
    files = sorted((run_dir / "attempts").glob("*.json"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0)
    return [x for x in (_try_json(p) for p in files) if isinstance(x, dict)]


def _try_json(path: Path) -> Any:
    try:
        return read_json(path)
    except (DamagedFile, OSError):
        return None


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def summarize_metrics(rows: list[dict]) -> dict:
    """The numbers a reader wants first, derived from metrics rows (verdicts re-derive their own)."""
    evals = [(r["step"], r["eval/reward"]) for r in rows if "eval/reward" in r]
    steps = [r for r in rows if r["step"] > 0]
    step_times = sorted(r["time/rollout_s"] + r["time/train_s"] for r in steps if "time/train_s" in r)
    peaks = [r["memory/peak_gib"] for r in rows if "memory/peak_gib" in r]  # step 0's: its held-out eval
    return {
        "steps_completed": max((r["step"] for r in rows), default=0),
        "eval_start": evals[0][1] if evals and evals[0][0] == 0 else None,
        "eval_end": evals[-1][1] if evals and evals[-1][0] > 0 else None,
        "peak_memory_gib": max(peaks, default=None),
        "median_step_s": step_times[len(step_times) // 2] if step_times else None,
    }
