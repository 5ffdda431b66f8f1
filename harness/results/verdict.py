"""Verdicts from results/ alone: per run, then per cell over its seeds against its baseline cell.

Thresholds come from the matrix's `criteria:` (saved in results/<matrix>/matrix.json). The rules,
and the curves that chose them, are in the README's "Verdicts"; in short:
- a run is judged on its *final score*, the mean of its evals (eval/reward, or eval/avg@k with `score: avg`) in the
  last `final_window` of training, not on one evaluation (seed sd 0.030 -> 0.021 on the H200 smoke study);
- it *diverges* on a non-finite value, on a sustained KL rise (the rolling median of `kl` over
  `kl_window` steps above `kl_max`, for recipes with a KL term in their loss) or on a held-out reward
  that collapses (final score more than `drop_max` below its best eval). Single-step k3 spikes are
  counted and shown, never judged: k3 is heavy-tailed (9 of 24 H200 seeds spike above 1.0 while
  their 10-step median stays under 0.3, and TRL's GRPOTrainer shows the same);
- a cell that learns and is stable is Converges, Inconclusive or Convergence issue as its interval
  of Δ versus the baseline lies above, across or below -tolerance.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.common.files import write_json_atomic
from harness.config.matrix import Criteria
from harness.config.run import RunConfig
from harness.evals.passk import samples_of
from harness.results.intervals import MAX_SEEDS_SUGGESTED, Difference, difference, seeds_to_decide, t_interval
from harness.results.layout import damage, finite, read_json, read_metrics
from harness.results.looks import Look, look_at

RUN_VERDICTS = ("converged", "no_learning", "diverged", "collapsed", "failed", "oom", "infeasible", "incomplete", "not_judged")
NOT_JUDGED = "Not judged (random weights)"  # a `shape:` model's cell: run for throughput and memory (models/shape.py)
CELL_VERDICTS = ("Converges", "Inconclusive", "Convergence issue", "Does not converge", "Error", "Infeasible", "Incomplete",
                 "Smoke tested", NOT_JUDGED)


@dataclass
class RunVerdict:
    run_id: str
    seed: int
    verdict: str
    reason: str
    eval_start: float | None = None
    eval_end: float | None = None  # the last eval
    eval_final: float | None = None  # the final score: mean of the evals at final_steps
    final_steps: list[int] = field(default_factory=list)
    eval_best: float | None = None
    eval_se: float | None = None  # binomial standard error of one eval at the final score: sqrt(p(1-p)/n)
    score: str = "eval/reward"  # the metric every eval above is (criteria.score: greedy eval/reward or eval/avg@k)
    max_kl: float | None = None  # the largest single-step kl
    kl_median_max: float | None = None  # the largest rolling median of kl over kl_window steps
    kl_spikes: int = 0  # steps whose kl exceeds kl_max
    kl_judged: bool = True  # False: the recipe has no KL term in its loss, so kl is information
    final_entropy: float | None = None
    peak_memory_gib: float | None = None
    memory_estimate_gib: float | None = None  # the pre-check's estimate of peak_memory_gib
    median_step_s: float | None = None
    rollout_tokens_per_s: float | None = None
    lm_eval: dict | None = None  # evals.lm_eval.evaluate_run's results, when the matrix asks for them
    trained_to_end: bool = False  # every step ran (status ok): only then is eval_final a final score
    damage: str | None = None  # why its files cannot be trusted (results.damage): judged as not finished

    @property
    def gain(self) -> float | None:
        return None if self.eval_start is None or self.eval_final is None else self.eval_final - self.eval_start


def rolling_median(xs: list[float], window: int) -> list[float]:
    """Median of each full window of `window` consecutive values (of all of them when there are fewer)."""
    if len(xs) < window:
        return [statistics.median(xs)] if xs else []
    return [statistics.median(xs[i - window:i]) for i in range(window, len(xs) + 1)]


def final_window(evals: list[tuple[int, float]], fraction: float) -> list[tuple[int, float]]:
    """The evals after step 0 in the last `fraction` of training; at least the last one."""
    later = [(s, x) for s, x in evals if s > 0]
    if not later:
        return []
    cut = later[-1][0] * (1 - fraction) - 1e-9  # 200 x (1 - 0.45) is 110.00000000000001: keep the eval at step 110
    return [(s, x) for s, x in later if s >= cut]


def _eval_n(rows: list[dict], run_dir: Path) -> int | None:
    """Prompts per eval: logged as eval/n; runs from before it was logged have it in config.json."""
    n = next((r["eval/n"] for r in reversed(rows) if "eval/n" in r), None)
    if n is None and (run_dir / "config.json").exists():
        try:
            n = (read_json(run_dir / "config.json").get("task") or {}).get("eval_size")
        except ValueError:  # a torn config.json: the eval's size is unknown, the run is still judged
            return None
    return n


def _kl_facts(v: RunVerdict, train_rows: list[dict], c: Criteria) -> int | None:
    """Fill the kl evidence; the step at which the rolling median first exceeds kl_max, if it does."""
    steps = [(r["step"], r["kl"]) for r in train_rows if finite(r.get("kl"))]
    kls = [k for _, k in steps]
    v.max_kl = max(kls, default=None)
    v.kl_spikes = sum(k > c.kl_max for k in kls)
    medians = rolling_median(kls, c.kl_window)
    v.kl_median_max = max(medians, default=None)
    first = next((i for i, m in enumerate(medians) if m > c.kl_max), None)
    return None if first is None else steps[min(first + c.kl_window, len(steps)) - 1][0]


def _instability(v: RunVerdict, train_rows: list[dict], c: Criteria, evals: list[tuple[int, float]]) -> list[str]:
    """Why the run is unstable, in words; empty when it is not."""
    why = []
    over = _kl_facts(v, train_rows, c)
    if over is not None and v.kl_judged:
        why.append(f"kl rolling median over {c.kl_window} steps above kl_max {c.kl_max} from step {over} (largest "
                   f"{v.kl_median_max:.3f}): a sustained rise, not a spike")
    # Fallen (the final score) and not recovered (the last eval): a run still climbing has its best eval last,
    # and the mean of a rising window alone would sit below that best.
    if (v.eval_final is not None and v.eval_best is not None
            and min(v.eval_best - v.eval_final, v.eval_best - v.eval_end) > c.drop_max):
        best_step = next(s for s, x in evals if s > 0 and x == v.eval_best)
        why.append(f"held-out {v.score} collapsed: best {v.eval_best:.3f} at step {best_step}, final {v.eval_final:.3f} "
                   f"(last {v.eval_end:.3f}), {v.eval_best - v.eval_final:.3f} below it (drop_max {c.drop_max})")
    return why


def _spike_note(v: RunVerdict, c: Criteria) -> str:
    if not v.kl_judged:
        return "; kl not judged: no KL term in this recipe's loss"
    if not v.kl_spikes:
        return ""
    s = "s" if v.kl_spikes > 1 else ""
    return (f"; {v.kl_spikes} single-step kl spike{s} above {c.kl_max} (largest {v.max_kl:.2f}), "
            f"rolling median ≤ {v.kl_median_max:.3f}: not judged")


def judge_run(run_dir: Path, seed: int, c: Criteria, kl_in_loss: bool = True) -> RunVerdict:
    v = RunVerdict(run_dir.name, seed, "incomplete", "no summary.json: not run, or interrupted", kl_judged=kl_in_loss)
    if not (run_dir / "summary.json").exists():
        return v
    v.damage = damage(run_dir)
    if v.damage:
        v.reason = f"not trusted, judged as unfinished: {v.damage}; the next sweep resumes it"
        return v
    summary, rows = read_json(run_dir / "summary.json"), read_metrics(run_dir)
    train_rows = [r for r in rows if r["step"] > 0 and "kl" in r]
    v.score = score_metric(rows, c)
    evals = [(r["step"], r[v.score]) for r in rows if v.score in r]
    if evals and evals[0][0] == 0:
        v.eval_start = evals[0][1]
    window = final_window(evals, c.final_window)
    if window:
        v.eval_end, v.final_steps = window[-1][1], [s for s, _ in window]
        v.eval_final = statistics.fmean(x for _, x in window)
        v.eval_best = max(x for s, x in evals if s > 0)
        n = _eval_n(rows, run_dir)
        n = n * samples_of(v.score) if n and c.score == "avg" else n  # avg@k: k samples of each prompt
        v.eval_se = math.sqrt(v.eval_final * (1 - v.eval_final) / n) if n and 0 <= v.eval_final <= 1 else None
    v.final_entropy = train_rows[-1]["entropy"] if train_rows else None
    v.peak_memory_gib = summary.get("peak_memory_gib")
    v.memory_estimate_gib = (summary.get("memory_estimate") or {}).get("peak_gib")
    v.lm_eval = summary.get("lm_eval")
    v.median_step_s = summary.get("median_step_s")
    tps = sorted(r["throughput/rollout_tokens_per_s"] for r in train_rows if "throughput/rollout_tokens_per_s" in r)
    v.rollout_tokens_per_s = tps[len(tps) // 2] if tps else None

    status = summary.get("status")
    v.trained_to_end = status == "ok"
    if status in ("failed", "oom", "infeasible", "killed"):  # killed: its process died (the local and ray executors)
        v.verdict = "failed" if status == "killed" else status
        v.reason = summary.get("error") or status
        return v
    model = read_json(run_dir / "env.json").get("model") or {} if (run_dir / "env.json").exists() else {}
    if model.get("random_weights"):  # env.json's models.loading.identity: rewards of random weights judge nothing
        v.verdict, v.reason = "not_judged", f"{model['name']} has random weights: run for throughput and memory only"
        return v
    bad = next(((r["step"], k) for r in rows for k, x in r.items() if isinstance(x, float) and not finite(x)), None)
    if status == "nan" or bad:
        _kl_facts(v, train_rows, c)
        v.verdict = "diverged"
        v.reason = summary.get("error") or f"non-finite {bad[1]} at step {bad[0]}"
        return v
    unstable = _instability(v, train_rows, c, evals)
    if unstable:
        v.verdict, v.reason = "diverged", "; ".join(unstable)
        return v
    if v.gain is None:  # finished, so no later sweep reruns it: it must not count as a missing seed
        v.verdict, v.reason = "no_learning", f"finished without a step-0 and a final {v.score}: learning not shown"
        return v
    score = f"{v.score} {v.eval_start:.3f} → {v.eval_final:.3f} (mean of steps {_steps(v.final_steps)})"
    if v.gain < c.min_gain:
        if v.final_entropy is not None and v.final_entropy < c.entropy_floor:
            v.verdict = "collapsed"
            v.reason = (f"entropy {v.final_entropy:.3g} under entropy_floor {c.entropy_floor} at step {train_rows[-1]['step']}, "
                        f"gain {_signed(v.gain)}")
        else:
            v.verdict, v.reason = "no_learning", f"{score}: gain {_signed(v.gain)} under min_gain {c.min_gain}"
        return v
    v.verdict, v.reason = "converged", f"{score}, gain {v.gain:+.3f}{_spike_note(v, c)}"
    return v


def score_metric(rows: list[dict], c: Criteria) -> str:
    """The metric a run is judged on: eval/reward, or with criteria.score avg the eval/avg@k it logged."""
    if c.score == "greedy":
        return "eval/reward"
    return next((k for r in rows for k in r if k.startswith("eval/avg@")), "eval/avg@k")


def _signed(x: float) -> str:
    return f"{round(x, 3) + 0.0:+.3f}"  # + 0.0: a gain of -1e-17 reads +0.000, not -0.000


def _steps(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 3 else f"{steps[0]}–{steps[-1]}"


@dataclass
class CellVerdict:
    name: str
    key: dict
    label: str | None
    baseline: str | None
    status: str
    reason: str
    runs: list[RunVerdict]
    eval_final_mean: float | None = None  # mean final score of the seeds that trained to the end
    eval_final_ci: tuple[float, float] | None = None  # two-sided t-interval at `confidence`
    eval_se: float | None = None  # binomial standard error of one eval at that score
    delta_vs_baseline: float | None = None  # mean final score minus the baseline's
    delta_lower_bound: float | None = None  # one-sided bounds at `confidence`: non-inferior above -tolerance,
    delta_upper_bound: float | None = None  # shown worse below it
    test: str | None = None  # which interval, in words, for the report
    seeds_to_decide: int | None = None  # Inconclusive: seeds per arm that would likely decide it
    look: int = 1  # adaptive seeds: the look (round) whose seeds this verdict is on
    looks: int = 1  # ... of how many looks the matrix plans

    def stat(self, field: str) -> list[float]:
        return [x for r in self.runs if (x := getattr(r, field)) is not None]


def final_scores(runs: list[RunVerdict]) -> dict[int, float]:
    """seed -> final score of the runs that trained to the end: a crashed, killed or NaN-stopped run
    has only the evals from before it stopped."""
    return {r.seed: r.eval_final for r in runs if r.trained_to_end and finite(r.eval_final)}


def judge_cell(name, key, label, runs: list[RunVerdict], baseline_name: str | None, baseline: CellVerdict | None, c: Criteria,
               baseline_declared: bool, look: Look = Look()) -> CellVerdict:
    """baseline_declared: the matrix names a baseline, so a cell without one (its baseline cell was
    excluded) has nothing to be non-inferior to. The baseline cell itself is judged on learning and
    stability alone. `look`: which look of adaptive seeds this is; Δ is bounded at its confidence and
    against the baseline's first len(runs) seeds, so a verdict reached at a look stays what it was
    when the baseline later runs more seeds for another cell."""
    cell = CellVerdict(name, key, label, baseline_name, "", "", runs, look=look.index, looks=look.of)
    confidence = look.confidence(c.confidence)
    finished = [r for r in runs if r.verdict != "incomplete"]
    errors = [r for r in runs if r.verdict in ("failed", "oom")]
    infeasible = [r for r in runs if r.verdict == "infeasible"]
    learned = [r for r in finished if r.verdict == "converged"]  # learned and stable
    gained = [r for r in finished if r.trained_to_end and r.gain is not None and r.gain >= c.min_gain]  # learned, stable or not
    ends = final_scores(finished)
    if ends:
        cell.eval_final_mean = statistics.fmean(ends.values())
        ses = [r.eval_se for r in finished if r.seed in ends and r.eval_se is not None]  # the runs the mean is over
        cell.eval_se = statistics.fmean(ses) if ses else None
    if len(ends) >= 2:
        cell.eval_final_ci = t_interval(list(ends.values()), c.confidence)
    seeds = f"{len(finished)}/{len(runs)} seeds finished"
    # the baseline's seeds this cell is compared with: its first ones, as many as the cell's; what the baseline
    # later runs for another cell (adaptive seeds) cannot unsettle a verdict reached on these
    against = baseline.runs[:len(runs)] if baseline is not None else []
    against_status = _status_of(against)
    comparable = baseline is not None and baseline.name != name and against_status is None and _status_of(runs) != NOT_JUDGED
    d = difference(ends, final_scores(against), confidence) if comparable else None
    if d:  # the evidence column shows Δ whatever the verdict
        cell.delta_vs_baseline, cell.delta_lower_bound, cell.delta_upper_bound, cell.test = d.mean, d.lower, d.upper, d.method

    stable = f"all {len(finished)} seeds learn (gain ≥ {c.min_gain}) and are stable"
    if errors:
        cell.status, cell.reason = "Error", f"seed {errors[0].seed}: {errors[0].reason}"
    elif infeasible:
        cell.status, cell.reason = "Infeasible", infeasible[0].reason
    elif not finished:
        cell.status, cell.reason = "Incomplete", seeds
    elif any(r.verdict == "not_judged" for r in finished):
        cell.status, cell.reason = NOT_JUDGED, next(r.reason for r in finished if r.verdict == "not_judged")
    elif len(finished) < c.min_seeds:
        cell.status = "Smoke tested"
        cell.reason = f"{seeds}, fewer than min_seeds {c.min_seeds}: " + "; ".join(f"seed {r.seed} {r.verdict}" for r in finished)
    elif not gained:  # ❌ is "it does not learn"; learning that is unstable is a convergence issue
        cell.status, cell.reason = "Does not converge", "; ".join(f"seed {r.seed}: {r.reason}" for r in finished)
    elif len(learned) < len(finished):
        bad = [r for r in finished if r.verdict != "converged"]
        kinds = sorted({r.verdict.replace("_", " ") for r in bad})
        others = "while the others learn" if learned else f"although {len(gained)} gain ≥ {c.min_gain}"
        cell.status = "Convergence issue"
        cell.reason = (f"{len(bad)}/{len(finished)} seeds {' or '.join(kinds)} {others}: "
                       + "; ".join(f"seed {r.seed}: {r.reason}" for r in bad))
    elif baseline_name is None and baseline_declared:
        cell.status = "Smoke tested"
        cell.reason = f"{stable}, but its baseline cell is excluded from the matrix: no non-inferiority test"
    elif baseline is None or baseline.name == name:
        alone = " (the baseline: judged on learning and stability alone)" if baseline_name == name else ""
        cell.status, cell.reason = "Converges", stable + alone
    elif not comparable:
        cell.status, cell.reason = "Incomplete", f"baseline cell is {against_status}: no comparison possible"
    elif d is None:
        cell.status, cell.reason = "Smoke tested", "too few seeds in this cell or its baseline for the non-inferiority test"
    else:
        level = f"{confidence:.1%}".replace(".0%", "%")
        at = f" (look {look.index} of {look.of}, {c.confidence:.0%} over all looks)" if look.of > 1 else ""
        bounds = f"Δ {d.mean:+.3f}, {level} bounds [{d.lower:+.3f}, {d.upper:+.3f}]{at} vs -{c.tolerance}"
        cell.status = decide(d, c.tolerance)
        if cell.status == "Converges":
            cell.reason = f"{stable}; non-inferior to the baseline ({bounds})"
        elif cell.status == "Convergence issue":
            cell.reason = f"learns, but shown worse than the baseline ({bounds})"
        else:
            cell.seeds_to_decide = need = seeds_to_decide(d, c.tolerance, confidence, c.power)
            more = (f"about {need} seeds per cell would likely decide it" if need
                    else f"more than {MAX_SEEDS_SUGGESTED} seeds per cell: Δ sits on the tolerance itself")
            if look.index < look.of:
                more = f"the sweep adds seeds; {more}"
            elif look.of > 1:
                more = f"still so at seeds.max {len(runs)}; {more}"
            cell.reason = (f"{stable}, but not shown non-inferior nor worse ({bounds}): {more} "
                           f"({c.power:.0%} power, if Δ and the seed spread stay as observed)")
    return cell


def _status_of(runs: list[RunVerdict]) -> str | None:
    """Why these baseline runs cannot be compared with (the status judge_cell gives a cell of them), or None."""
    if any(r.verdict in ("failed", "oom") for r in runs):
        return "Error"
    if any(r.verdict == "infeasible" for r in runs):
        return "Infeasible"
    if any(r.verdict == "not_judged" for r in runs):
        return NOT_JUDGED
    if all(r.verdict == "incomplete" for r in runs):
        return "Incomplete"
    return None


def decide(d: Difference, tolerance: float) -> str:
    """Non-inferior (Converges), shown worse (Convergence issue) or neither, from the one-sided bounds on Δ."""
    if d.lower > -tolerance:
        return "Converges"
    if d.upper < -tolerance:
        return "Convergence issue"
    return "Inconclusive"


def judge(root: Path, write: bool = True) -> list[CellVerdict]:
    """Judge every cell of the sweep in `root` (and write root/verdicts.json)."""
    matrix = read_json(root / "matrix.json")
    c = Criteria(**matrix["criteria"])
    looks = matrix.get("looks") or [0]  # a sweep saved before adaptive seeds: one look
    runs = {cell["name"]: [judge_run(root / r["run_id"], r["seed"], c, _kl_in_loss(root / r["run_id"], r)) for r in cell["runs"]]
            for cell in matrix["cells"]}
    done: dict[str, CellVerdict] = {}
    # baselines first, so every other cell can be compared with its baseline's verdict
    for cell in sorted(matrix["cells"], key=lambda x: x["baseline"] not in (None, x["name"])):
        base = done.get(cell["baseline"]) if cell["baseline"] else None
        v = judge_cell(cell["name"], cell["key"], cell["label"], runs[cell["name"]], cell["baseline"], base, c,
                       bool(matrix["baseline"]), look_at(looks, len(cell["runs"]), matrix.get("looks_k")))
        missing = sum(r.verdict == "incomplete" for r in v.runs)
        if missing and v.status not in ("Incomplete", "Smoke tested"):
            v.reason += f" ({missing} of {len(v.runs)} seeds not finished yet)"
        done[cell["name"]] = v
    verdicts = [done[cell["name"]] for cell in matrix["cells"]]
    if write:
        write_json_atomic(root / "verdicts.json",
                          [asdict(v) | {"runs": [asdict(r) | {"gain": r.gain} for r in v.runs]} for v in verdicts])
    return verdicts


def _kl_in_loss(run_dir: Path, run: dict) -> bool:
    """matrix.json says (RunConfig.kl_in_loss); a sweep saved before it did is read from the run's config.json,
    and a run with neither is judged on KL, as every run was before."""
    if "kl_in_loss" in run:
        return run["kl_in_loss"]
    try:
        return RunConfig.model_validate(read_json(run_dir / "config.json")).kl_in_loss
    except (OSError, ValueError):  # no config.json, or one an older harness wrote
        return True


def read_verdicts(path: Path) -> list[CellVerdict]:
    """The verdicts a sweep (verdicts.json) or a report folder saved, as judge() returned them."""
    import dataclasses

    run_fields = {f.name for f in dataclasses.fields(RunVerdict)}
    cell_fields = {f.name for f in dataclasses.fields(CellVerdict)} - {"runs", "eval_final_ci"}

    def cell(d: dict) -> CellVerdict:
        runs = [RunVerdict(**{k: v for k, v in r.items() if k in run_fields}) for r in d["runs"]]
        ci = d.get("eval_final_ci")
        return CellVerdict(**{k: v for k, v in d.items() if k in cell_fields},
                           runs=runs, eval_final_ci=tuple(ci) if ci else None)

    return [cell(d) for d in read_json(path)]
