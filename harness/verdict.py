"""Verdicts from results/ alone: per run, then per cell over its seeds against its baseline cell.

Thresholds come from the matrix's `criteria:` (saved in results/<matrix>/matrix.json).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from scipy import stats

from harness.matrix import Criteria
from harness.results import finite, read_json, read_metrics, write_json_atomic

RUN_VERDICTS = ("converged", "no_learning", "diverged", "collapsed", "failed", "oom", "infeasible", "incomplete")
CELL_VERDICTS = ("Converges", "Convergence issue", "Does not converge", "Error", "Infeasible", "Incomplete", "Smoke tested")


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
    memory_estimate_gib: float | None = None  # the pre-check's estimate of peak_memory_gib
    median_step_s: float | None = None
    rollout_tokens_per_s: float | None = None
    lm_eval: dict | None = None  # lm_eval_run.evaluate_run's results, when the matrix asks for them
    trained_to_end: bool = False  # every step ran (status ok): only then is eval_end a final eval/reward

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
    v.memory_estimate_gib = (summary.get("memory_estimate") or {}).get("peak_gib")
    v.lm_eval = summary.get("lm_eval")
    v.median_step_s = summary.get("median_step_s")
    tps = sorted(r["throughput/rollout_tokens_per_s"] for r in train_rows)
    v.rollout_tokens_per_s = tps[len(tps) // 2] if tps else None

    status = summary.get("status")
    v.trained_to_end = status == "ok"
    if status in ("failed", "oom", "infeasible", "killed"):  # killed: its process died (executor_local, executor_ray)
        v.verdict = "failed" if status == "killed" else status
        v.reason = summary.get("error") or status
        return v
    bad = next(((r["step"], k) for r in rows for k, x in r.items() if isinstance(x, float) and not finite(x)), None)
    if status == "nan" or bad:
        v.verdict = "diverged"
        v.reason = summary.get("error") or f"non-finite {bad[1]} at step {bad[0]}"
        return v
    over = next((r for r in train_rows if r["kl"] > c.kl_max), None)
    if over:
        v.verdict, v.reason = "diverged", f"kl {over['kl']:.3f} exceeds kl_max {c.kl_max} at step {over['step']}"
        return v
    if v.gain is None:  # finished, so no later sweep reruns it: it must not count as a missing seed
        v.verdict, v.reason = "no_learning", "finished without a step-0 and a final eval/reward: learning not shown"
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
    eval_end_mean: float | None = None
    eval_end_ci: tuple[float, float] | None = None  # two-sided t-interval at `confidence`
    delta_vs_baseline: float | None = None  # mean final eval/reward minus the baseline's
    delta_lower_bound: float | None = None  # one-sided lower bound at `confidence`: the non-inferiority test
    test: str | None = None  # which interval, in words, for the report

    def stat(self, field: str) -> list[float]:
        return [x for r in self.runs if (x := getattr(r, field)) is not None]


def t_interval(xs: list[float], confidence: float) -> tuple[float, float]:
    """Two-sided Student-t interval for the mean of xs (n >= 2)."""
    n, mean = len(xs), statistics.fmean(xs)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * statistics.stdev(xs) / math.sqrt(n)
    return float(mean - half), float(mean + half)


def difference_lower_bound(ours: dict[int, float], theirs: dict[int, float], confidence: float) -> tuple[float, float, str] | None:
    """(mean difference, one-sided lower confidence bound, method) of ours - theirs.

    Seeds shared by both cells are paired (same seed: same prompts drawn, same initial noise),
    which removes the between-seed variance they share; otherwise Welch's unpaired interval.
    """
    shared = sorted(ours)
    if ours.keys() == theirs.keys() and len(shared) >= 2:  # pairing a subset would drop the other seeds unseen
        d = [ours[s] - theirs[s] for s in shared]
        mean, se, df = statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d)), len(d) - 1
        method = f"paired one-sided t bound over {len(d)} seeds"
    elif len(ours) >= 2 and len(theirs) >= 2:
        a, b = list(ours.values()), list(theirs.values())
        va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
        mean, se = statistics.fmean(a) - statistics.fmean(b), math.sqrt(va + vb)
        df = (va + vb) ** 2 / ((va**2 / (len(a) - 1)) + (vb**2 / (len(b) - 1))) if va + vb > 0 else len(a) + len(b) - 2
        method = "Welch one-sided t bound"
    else:
        return None
    return mean, float(mean - stats.t.ppf(confidence, df) * se), method


def final_evals(runs: list[RunVerdict]) -> dict[int, float]:
    """seed -> final eval/reward of the runs that trained to the end: a crashed, killed or NaN-stopped
    run has only its last eval before it stopped."""
    return {r.seed: r.eval_end for r in runs if r.trained_to_end and r.eval_end is not None}


def judge_cell(name, key, label, runs: list[RunVerdict], baseline_name: str | None, baseline: CellVerdict | None, c: Criteria,
               baseline_declared: bool) -> CellVerdict:
    """baseline_declared: the matrix names a baseline, so a cell without one (its baseline cell was
    excluded) has nothing to be non-inferior to."""
    cell = CellVerdict(name, key, label, baseline_name, "", "", runs)
    finished = [r for r in runs if r.verdict != "incomplete"]
    errors = [r for r in runs if r.verdict in ("failed", "oom")]
    infeasible = [r for r in runs if r.verdict == "infeasible"]
    learned = [r for r in finished if r.verdict == "converged"]
    ends = final_evals(finished)
    if ends:
        cell.eval_end_mean = statistics.fmean(ends.values())
    if len(ends) >= 2:
        cell.eval_end_ci = t_interval(list(ends.values()), c.confidence)
    seeds = f"{len(finished)}/{len(runs)} seeds finished"
    comparable = baseline is not None and baseline.name != name and baseline.status not in ("Incomplete", "Error", "Infeasible")
    if comparable:  # the evidence column shows Δ whatever the verdict
        base_ends = final_evals(baseline.runs)
        found = difference_lower_bound(ends, base_ends, c.confidence)
        if found:
            cell.delta_vs_baseline, cell.delta_lower_bound, cell.test = found

    if errors:
        cell.status, cell.reason = "Error", f"seed {errors[0].seed}: {errors[0].reason}"
    elif infeasible:
        cell.status, cell.reason = "Infeasible", infeasible[0].reason
    elif not finished:
        cell.status, cell.reason = "Incomplete", seeds
    elif len(finished) < c.min_seeds:
        cell.status = "Smoke tested"
        cell.reason = f"{seeds}, fewer than min_seeds {c.min_seeds}: " + "; ".join(f"seed {r.seed} {r.verdict}" for r in finished)
    elif not learned:
        cell.status, cell.reason = "Does not converge", "; ".join(f"seed {r.seed}: {r.reason}" for r in finished)
    elif len(learned) < len(finished):
        bad = [r for r in finished if r.verdict != "converged"]
        cell.status = "Convergence issue"
        cell.reason = f"{len(bad)}/{len(finished)} seeds unstable or not learning: " + "; ".join(f"seed {r.seed}: {r.reason}" for r in bad)
    elif baseline_name is None and baseline_declared:
        cell.status = "Smoke tested"
        cell.reason = f"all {len(finished)} seeds learn (gain ≥ {c.min_gain}), but its baseline cell is excluded from the matrix: no non-inferiority test"
    elif baseline is None or baseline.name == name:
        cell.status, cell.reason = "Converges", f"all {len(finished)} seeds learn (gain ≥ {c.min_gain})"
    elif not comparable:
        cell.status, cell.reason = "Incomplete", f"baseline cell is {baseline.status}: no comparison possible"
    elif cell.delta_lower_bound is None:
        cell.status, cell.reason = "Smoke tested", "too few seeds in this cell or its baseline for the non-inferiority test"
    else:
        bound = f"Δ {cell.delta_vs_baseline:+.3f}, {c.confidence:.0%} lower bound {cell.delta_lower_bound:+.3f} vs -{c.tolerance}"
        if cell.delta_lower_bound < -c.tolerance:
            cell.status = "Convergence issue"
            worse = "worse than" if cell.delta_vs_baseline < -c.tolerance else "not shown non-inferior to"
            cell.reason = f"learns, but {worse} the baseline ({bound}); more seeds narrow the bound"
        else:
            cell.status = "Converges"
            cell.reason = f"all {len(finished)} seeds learn (gain ≥ {c.min_gain}); non-inferior to the baseline ({bound})"
    return cell


def judge(root: Path, write: bool = True) -> list[CellVerdict]:
    """Judge every cell of the sweep in `root` (and write root/verdicts.json)."""
    matrix = read_json(root / "matrix.json")
    c = Criteria(**matrix["criteria"])
    runs = {cell["name"]: [judge_run(root / r["run_id"], r["seed"], c) for r in cell["runs"]] for cell in matrix["cells"]}
    done: dict[str, CellVerdict] = {}
    # baselines first, so every other cell can be compared with its baseline's verdict
    for cell in sorted(matrix["cells"], key=lambda x: x["baseline"] not in (None, x["name"])):
        base = done.get(cell["baseline"]) if cell["baseline"] else None
        v = judge_cell(cell["name"], cell["key"], cell["label"], runs[cell["name"]], cell["baseline"], base, c, bool(matrix["baseline"]))
        missing = sum(r.verdict == "incomplete" for r in v.runs)
        if missing and v.status not in ("Incomplete", "Smoke tested"):
            v.reason += f" ({missing} of {len(v.runs)} seeds not finished yet)"
        done[cell["name"]] = v
    verdicts = [done[cell["name"]] for cell in matrix["cells"]]
    if write:
        write_json_atomic(root / "verdicts.json", [asdict(v) | {"runs": [asdict(r) | {"gain": r.gain} for r in v.runs]} for v in verdicts])
    return verdicts
