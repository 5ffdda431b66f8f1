"""Verdicts from results/ alone: per run, then per cell over its seeds against its baseline cell.

Thresholds come from the matrix's `criteria:` (saved in results/<matrix>/matrix.json).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.matrix import Criteria
from harness.results import finite, read_json, read_metrics, write_json_atomic

RUN_VERDICTS = ("converged", "no_learning", "diverged", "collapsed", "failed", "oom", "incomplete")
CELL_VERDICTS = ("Converges", "Convergence issue", "Does not converge", "Error", "Incomplete")


@dataclass
class RunVerdict:
    run_id: str
    seed: int
    verdict: str
    reason: str
    eval_start: float | None = None
    eval_end: float | None = None
    max_kl: float | None = None
    final_entropy: float | None = None
    peak_memory_gib: float | None = None
    median_step_s: float | None = None
    rollout_tokens_per_s: float | None = None

    @property
    def gain(self) -> float | None:
        return None if self.eval_start is None or self.eval_end is None else self.eval_end - self.eval_start


def judge_run(run_dir: Path, seed: int, c: Criteria) -> RunVerdict:
    v = RunVerdict(run_dir.name, seed, "incomplete", "no summary.json: not run, or interrupted")
    if not (run_dir / "summary.json").exists():
        return v
    summary, rows = read_json(run_dir / "summary.json"), read_metrics(run_dir)
    train_rows = [r for r in rows if r["step"] > 0 and "kl" in r]
    evals = [(r["step"], r["eval/reward"]) for r in rows if "eval/reward" in r]
    if evals and evals[0][0] == 0:
        v.eval_start = evals[0][1]
    if evals and evals[-1][0] > 0:
        v.eval_end = evals[-1][1]
    kls = [r["kl"] for r in train_rows if finite(r["kl"])]
    v.max_kl = max(kls, default=None)
    v.final_entropy = train_rows[-1]["entropy"] if train_rows else None
    v.peak_memory_gib = summary.get("peak_memory_gib")
    v.median_step_s = summary.get("median_step_s")
    tps = sorted(r["throughput/rollout_tokens_per_s"] for r in train_rows)
    v.rollout_tokens_per_s = tps[len(tps) // 2] if tps else None

    status = summary.get("status")
    if status in ("failed", "oom"):
        v.verdict, v.reason = status, summary.get("error") or status
        return v
    bad = next(((r["step"], k) for r in rows for k, x in r.items() if isinstance(x, float) and not finite(x)), None)
    if status == "nan" or bad:
        v.verdict = "diverged"
        v.reason = summary.get("error") or f"non-finite {bad[1]} at step {bad[0]}"
        return v
    over = next((r for r in train_rows if r["kl"] > c.kl_max), None)
    if over:
        v.verdict, v.reason = "diverged", f"kl {over['kl']:.3g} exceeds kl_max {c.kl_max} at step {over['step']}"
        return v
    if v.gain is None:
        v.reason = "summary.json present but no start/end eval/reward"
        return v
    if v.gain < c.min_gain:
        if v.final_entropy is not None and v.final_entropy < c.entropy_floor:
            v.verdict = "collapsed"
            v.reason = f"entropy {v.final_entropy:.3g} under entropy_floor {c.entropy_floor} at step {train_rows[-1]['step']}, eval/reward gain {v.gain:+.3f}"
        else:
            v.verdict, v.reason = "no_learning", f"eval/reward gain {v.gain:+.3f} under min_gain {c.min_gain}"
        return v
    v.verdict, v.reason = "converged", f"eval/reward {v.eval_start:.3f} → {v.eval_end:.3f} ({v.gain:+.3f})"
    return v


@dataclass
class CellVerdict:
    name: str
    key: dict
    label: str | None
    baseline: str | None
    status: str
    reason: str
    runs: list[RunVerdict]
    delta_vs_baseline: float | None = None

    def stat(self, field: str) -> list[float]:
        return [x for r in self.runs if (x := getattr(r, field)) is not None]


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def judge_cell(name, key, label, runs: list[RunVerdict], baseline_name: str | None, baseline: CellVerdict | None, c: Criteria) -> CellVerdict:
    cell = CellVerdict(name, key, label, baseline_name, "", "", runs)
    kinds = [r.verdict for r in runs]
    errors = [r for r in runs if r.verdict in ("failed", "oom")]
    learned = [r for r in runs if r.verdict == "converged"]
    if errors:
        cell.status, cell.reason = "Error", f"seed {errors[0].seed}: {errors[0].reason}"
    elif "incomplete" in kinds:
        cell.status, cell.reason = "Incomplete", f"{len(runs) - kinds.count('incomplete')}/{len(runs)} seeds finished"
    elif not learned:
        cell.status, cell.reason = "Does not converge", "; ".join(f"seed {r.seed}: {r.reason}" for r in runs)
    elif len(learned) < len(runs):
        bad = [r for r in runs if r.verdict != "converged"]
        cell.status = "Convergence issue"
        cell.reason = f"{len(bad)}/{len(runs)} seeds unstable or not learning: " + "; ".join(f"seed {r.seed}: {r.reason}" for r in bad)
    else:
        cell.status, cell.reason = "Converges", f"all {len(runs)} seeds learn (gain ≥ {c.min_gain})"
    if baseline is not None and baseline.name != name:
        ours, theirs = _mean(cell.stat("eval_end")), _mean(baseline.stat("eval_end"))
        if ours is not None and theirs is not None:
            cell.delta_vs_baseline = ours - theirs
        if cell.status == "Converges":
            if baseline.status == "Incomplete":
                cell.status, cell.reason = "Incomplete", "baseline cell not finished"
            elif cell.delta_vs_baseline is not None and cell.delta_vs_baseline < -c.tolerance:
                cell.status = "Convergence issue"
                cell.reason = f"learns, but final eval/reward is {-cell.delta_vs_baseline:.3f} below the baseline's (tolerance {c.tolerance})"
            else:
                cell.reason += f"; final eval/reward within {c.tolerance} of the baseline's or above"
    return cell


def judge(root: Path) -> list[CellVerdict]:
    """Judge every cell of the sweep in `root` and write root/verdicts.json."""
    matrix = read_json(root / "matrix.json")
    c = Criteria(**matrix["criteria"])
    runs = {cell["name"]: [judge_run(root / r["run_id"], r["seed"], c) for r in cell["runs"]] for cell in matrix["cells"]}
    done: dict[str, CellVerdict] = {}
    # baselines first, so every other cell can be compared with its baseline's verdict
    for cell in sorted(matrix["cells"], key=lambda x: x["baseline"] not in (None, x["name"])):
        base = done.get(cell["baseline"]) if cell["baseline"] else None
        done[cell["name"]] = judge_cell(cell["name"], cell["key"], cell["label"], runs[cell["name"]], cell["baseline"], base, c)
    verdicts = [done[cell["name"]] for cell in matrix["cells"]]
    write_json_atomic(root / "verdicts.json", [asdict(v) | {"runs": [asdict(r) | {"gain": r.gain} for r in v.runs]} for v in verdicts])
    return verdicts
