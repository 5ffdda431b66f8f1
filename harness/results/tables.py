"""A sweep's results as pandas DataFrames, for people who analyse them elsewhere (`harness table`, `harness.steps`).

    steps(root)  one row per logged step per run: every metric a column, named as logged ("reward/mean", "eval/reward")
    runs(root)   one row per run: its verdict (the verdict module's RunVerdict) and its summary.json, flattened
    cells(root)  one row per cell: its status, reason and the evidence the report prints beside it

`root` is a sweep's results folder (results/<matrix>, with its matrix.json). Every row opens with the cell's axis
values (one column per key of the matrix's cells: its axes, then any field an `include` sets), then `cell`, `seed`
and `run_id`, so a table groups by any axis. Judging does not write (verdicts.json is left as it is), and damaged or
missing run files are what the verdict module makes of them: a damaged run is an `incomplete` row with its `damage`,
a run that never ran an `incomplete` row with empty summary columns; its logged steps are the rows before any torn
line (layout.read_metrics). Nested values (summary.json's memory_estimate, lm_eval) are flattened to dotted columns
("memory_estimate.peak_gib"); lists become JSON text, so every cell of a table is a scalar and a CSV holds it whole.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import pandas as pd

from harness.common.files import replacing
from harness.common.numbers import mean, median
from harness.errors import SweepNotFound, Unavailable, UsageError
from harness.results.layout import read_json, read_metrics, read_summary
from harness.results.verdict import RunVerdict, judge

FORMATS = ("csv", "parquet", "json")
ID_COLUMNS = ["cell", "seed", "run_id"]  # after the axis columns, in every table but cells (which has no seed, run_id)

# runs(): RunVerdict's fields in its order (run_id and seed are id columns; lm_eval is summary.json's, flattened
# there), with the `gain` property after the final score.
_RUN_FIELDS = {f.name: str(f.type) for f in fields(RunVerdict) if f.name not in ("run_id", "seed", "lm_eval")}
VERDICT_COLUMNS = [c for name in _RUN_FIELDS for c in ([name, "gain"] if name == "eval_final" else [name])]
# summary.json columns that lead (present even when no run has them); the rest follow, sorted. Keys the verdict
# columns already hold (eval_start, eval_end, peak_memory_gib, median_step_s: copied from summary.json or derived
# from the same metrics) and run_id are not repeated.
SUMMARY_LEAD = ["status", "error", "steps_completed", "wall_s"]

CELL_COLUMNS = ["cell", "label", "included", "baseline", "status", "reason", "seeds", "look", "looks", "seeds_finished",
                "seeds_converged",
                "eval_start_mean", "eval_final_mean", "eval_final_ci_lower", "eval_final_ci_upper", "eval_se",
                "delta_vs_baseline", "delta_lower_bound", "delta_upper_bound", "test", "seeds_to_decide",
                "max_kl", "kl_median_max", "kl_spikes", "final_entropy_mean", "peak_memory_gib", "memory_estimate_gib",
                "rollout_tokens_per_s", "median_step_s"]
_CELL_DTYPES = {"included": "bool", "seeds": "int64", "look": "int64", "looks": "int64", "seeds_finished": "int64",
                "seeds_converged": "int64",
                "kl_spikes": "int64", "seeds_to_decide": "Int64"} | dict.fromkeys(
    ["eval_start_mean", "eval_final_mean", "eval_final_ci_lower", "eval_final_ci_upper", "eval_se", "delta_vs_baseline",
     "delta_lower_bound", "delta_upper_bound", "max_kl", "kl_median_max", "final_entropy_mean", "peak_memory_gib",
     "memory_estimate_gib", "rollout_tokens_per_s", "median_step_s"], "float64")


def steps(root: str | Path) -> pd.DataFrame:
    """One row per logged step per run, in matrix order (cells, then seeds, then steps as logged).

    Columns: the axis columns, cell, seed (int64), run_id, step (int64), then every metric any run logged, sorted
    by name; a metric a row did not log is missing (NaN). A run with no metrics.jsonl has no rows."""
    root = Path(root)
    matrix = _matrix(root)
    axes = _axes(matrix)
    taken = {*axes, *ID_COLUMNS, "step"}
    records, metrics = [], set()
    for cell in matrix["cells"]:
        for run in cell["runs"]:
            head = _head(cell, run["seed"], run["run_id"], axes)
            for row in read_metrics(root / run["run_id"]):
                values = _flatten({k: v for k, v in row.items() if k != "step"})
                logged = {_free(k, taken, "metrics"): v for k, v in values.items()}
                metrics.update(logged)
                records.append(head | {"step": row["step"]} | logged)
    return _frame(records, [*axes, *ID_COLUMNS, "step", *sorted(metrics)], {"seed": "int64", "step": "int64"})


def runs(root: str | Path) -> pd.DataFrame:
    """One row per run of the matrix, in matrix order, as judged now (judge(root, write=False)).

    Columns: the axis columns, cell, seed, run_id; the verdict's (VERDICT_COLUMNS: verdict, reason, eval_start,
    eval_end, eval_final, gain, final_steps (JSON text), eval_best, eval_se, max_kl, kl_median_max, kl_spikes,
    kl_judged, final_entropy, peak_memory_gib, memory_estimate_gib, median_step_s, rollout_tokens_per_s,
    trained_to_end, damage); then summary.json's: SUMMARY_LEAD (status, error, steps_completed, wall_s), then its
    other keys flattened and sorted (device, memory_estimate.peak_gib, lm_eval.quantized.qrl_arith.exact_match, ...).
    The summary columns are empty for a run without a trusted summary.json (not run, interrupted or damaged)."""
    root = Path(root)
    matrix = _matrix(root)
    axes = _axes(matrix)
    cells = {c["name"]: c for c in matrix["cells"]}
    ids = {*axes, *ID_COLUMNS}
    records, extra = [], set()
    for verdict in judge(root, write=False):
        for rv in verdict.runs:
            row = _head(cells[verdict.name], rv.seed, rv.run_id, axes)
            row |= {name: _scalar(getattr(rv, name)) for name in VERDICT_COLUMNS}
            summary = _summary(root / rv.run_id) if rv.damage is None else None
            for key, value in _flatten(summary or {}).items():
                if key != "run_id" and key not in VERDICT_COLUMNS:
                    row[name := _free(key, ids, "summary")] = value
                    extra.add(name)
            records.append(row)
    columns = [*axes, *ID_COLUMNS, *VERDICT_COLUMNS, *SUMMARY_LEAD, *sorted(extra - set(SUMMARY_LEAD))]
    dtypes = {"seed": "int64", "steps_completed": "Int64", "wall_s": "float64"} | {
        name: {"float | None": "float64", "int": "int64", "bool": "bool"}[t]
        for name, t in _RUN_FIELDS.items() if t in ("float | None", "int", "bool")} | {"gain": "float64"}
    return _frame(records, columns, dtypes)


def cells(root: str | Path) -> pd.DataFrame:
    """One row per cell, in matrix order, as judged now (judge(root, write=False)).

    Columns: the axis columns, then CELL_COLUMNS: cell, label, included, baseline (the baseline cell's name), status,
    reason; seeds (planned so far), look and looks (adaptive seeds: the round the verdict is on, of how many),
    seeds_finished (not incomplete), seeds_converged; the CellVerdict evidence:
    eval_start_mean (mean step-0 eval/reward of its runs), eval_final_mean, eval_final_ci_lower/_upper (two-sided,
    at the criteria's confidence), eval_se, delta_vs_baseline, delta_lower_bound, delta_upper_bound (one-sided),
    test (which interval), seeds_to_decide (Int64; Inconclusive cells); and over its runs, as the report shows them:
    max_kl (max), kl_median_max (max), kl_spikes (sum), final_entropy_mean, peak_memory_gib (max),
    memory_estimate_gib (max), rollout_tokens_per_s (median), median_step_s (median)."""
    root = Path(root)
    matrix = _matrix(root)
    axes = _axes(matrix)
    by_name = {c["name"]: c for c in matrix["cells"]}
    records = []
    for v in judge(root, write=False):
        cell = by_name[v.name]
        ci = v.eval_final_ci or (None, None)
        row = {a: cell["key"].get(a) for a in axes} | {
            "cell": v.name, "label": v.label, "included": bool(cell.get("included")), "baseline": v.baseline,
            "status": v.status, "reason": v.reason, "seeds": len(v.runs), "look": v.look, "looks": v.looks,
            "seeds_finished": sum(r.verdict != "incomplete" for r in v.runs),
            "seeds_converged": sum(r.verdict == "converged" for r in v.runs),
            "eval_start_mean": mean(v.stat("eval_start")), "eval_final_mean": v.eval_final_mean,
            "eval_final_ci_lower": ci[0], "eval_final_ci_upper": ci[1], "eval_se": v.eval_se,
            "delta_vs_baseline": v.delta_vs_baseline, "delta_lower_bound": v.delta_lower_bound,
            "delta_upper_bound": v.delta_upper_bound, "test": v.test, "seeds_to_decide": v.seeds_to_decide,
            "max_kl": max(v.stat("max_kl"), default=None), "kl_median_max": max(v.stat("kl_median_max"), default=None),
            "kl_spikes": sum(r.kl_spikes for r in v.runs), "final_entropy_mean": mean(v.stat("final_entropy")),
            "peak_memory_gib": max(v.stat("peak_memory_gib"), default=None),
            "memory_estimate_gib": max(v.stat("memory_estimate_gib"), default=None),
            "rollout_tokens_per_s": median(v.stat("rollout_tokens_per_s")), "median_step_s": median(v.stat("median_step_s")),
        }
        records.append(row)
    return _frame(records, [*axes, *CELL_COLUMNS], _CELL_DTYPES)


def write(table: pd.DataFrame, path: str | Path, fmt: str) -> Path:
    """Write `table` to `path` as csv (no index), parquet (needs pyarrow) or json (a list of row objects; missing and
    non-finite numbers are null). Written to a temporary file beside it and renamed: a killed write leaves the
    old file or none, never half of one. Returns the path."""
    path, fmt = Path(path), str(fmt).lower().lstrip(".")
    if fmt not in FORMATS:
        raise UsageError(f"table format {fmt!r}: valid: {', '.join(FORMATS)}")
    if fmt == "parquet":
        _require_pyarrow()
    with replacing(path) as tmp:
        if fmt == "csv":
            table.to_csv(tmp, index=False)
        elif fmt == "parquet":
            _arrow_safe(table).to_parquet(tmp, index=False, engine="pyarrow")
        else:
            rows = [{str(k): _json_value(v) for k, v in row.items()} for row in table.to_dict(orient="records")]
            tmp.write_text(json.dumps(rows, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return path


# --- the pieces ---------------------------------------------------------------------------------------------------


def _matrix(root: Path) -> dict:
    """The sweep's matrix.json; SweepNotFound without one, DamagedFile (naming it) when it is torn."""
    if not (root / "matrix.json").is_file():
        raise SweepNotFound(f"no sweep at {root} (no matrix.json): run `harness sweep {root.name}` first")
    return read_json(root / "matrix.json")


def _axes(matrix: dict) -> list[str]:
    """The axis columns: the matrix's axes, then the other fields some cell's key sets (an `include` override)."""
    axes = list(matrix.get("axes") or [])
    for cell in matrix["cells"]:
        axes += [k for k in cell["key"] if k not in axes]
    return axes


def _head(cell: dict, seed: int, run_id: str, axes: list[str]) -> dict:
    return {a: cell["key"].get(a) for a in axes} | {"cell": cell["name"], "seed": seed, "run_id": run_id}


def _free(name: str, taken: set[str], source: str) -> str:
    """A logged name that would overwrite an id column ("cell", an axis) is kept as "<source>.<name>"."""
    return f"{source}.{name}" if name in taken else name


def _summary(run_dir: Path) -> dict | None:
    try:
        summary = read_summary(run_dir)
    except (OSError, ValueError):  # unreadable after all (a folder named summary.json): as the verdict, no summary
        return None
    return summary if isinstance(summary, dict) else None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": "[1, 2]"}: every value a scalar."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = _scalar(value)
    return out


def _scalar(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return value


def _frame(records: list[dict], columns: list[str], dtypes: dict[str, str]) -> pd.DataFrame:
    """A frame with exactly `columns` in that order (a key a record lacks is missing) and the given dtypes, so
    an empty sweep has the same columns and a seed is int64 whether or not any value is missing elsewhere."""
    df = pd.DataFrame(records, columns=columns)
    return df.astype({c: t for c, t in dtypes.items() if c in df.columns})


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise Unavailable("writing Parquet needs pyarrow, which is not installed: `pip install pyarrow` "
                          "(or write the table as CSV or JSON)") from None


def _arrow_safe(table: pd.DataFrame) -> pd.DataFrame:
    """Object columns that mix kinds of values (an axis of numbers and words, a summary field that is a number in
    one run and text in another) as text, which Parquet can hold; missing values stay missing."""
    out = table.copy()
    for name in out.columns:
        col = out[name]
        if col.dtype != object:
            continue
        kinds = {type(v) for v in col if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if len(kinds) > 1 and not kinds <= {int, float}:
            out[name] = col.map(lambda v: v if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
        elif kinds == {int, float}:
            out[name] = col.astype("float64")
    return out


def _json_value(v: Any) -> Any:
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):  # a numpy scalar
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
