"""One trial of a study: the cell's config with the trial's parameters, trained once per seed.

The seeds (`Study.trial_seeds`: the cell's seeds in order, `tune.seeds_per_trial` of them) run one
after another, each an ordinary run in its own folder. A seed's score is the verdicts' final score
(`verdict.judge_run(...).eval_final`: the mean of its evals in the last `criteria.final_window`),
and the trial's objective is the mean over its seeds (peak memory: the largest of its runs).
Per-seed scores are kept as the trial's user attrs `seed_scores` (seed -> score, JSON keys are
strings) and `seed_runs` (seed -> run_id), so the report can compare trials seed by seed.

Pruning. Seeds run sequentially, so what the pruner sees is laid out on one axis of
`seeds x train.steps` steps: seed k's evaluation at training step s is reported at step
k x steps + s, as the mean of eval/reward at training step s over seeds 0..k. Every trial runs the
same seeds in the same order, so at any reported step all trials average the same seeds at the
same training step (like with like, as the median pruner needs), and a trial whose first seed is
already far behind stops before its other seeds cost anything. Running the seeds side by side
would give the pruner all seeds at every step, but one process trains one run at a time.
Within a run no pruning happens at its last step (its score is known by then); between seeds the
pruner is asked once more, before the next seed starts.

Resuming. A seed's run folder is named by its config, so a trial queued again with the same
parameters finds its finished seeds (read and re-scored from their files, never trained again),
resumes an interrupted seed from its checkpoint and re-reports their evaluations to the new trial.
Scores are keyed by seed, so a seed is never counted twice.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from harness.common.files import locked
from harness.config.run import RunConfig
from harness.recipes import Pruned
from harness.results.layout import finite, is_finished, read_json, read_metrics

if TYPE_CHECKING:
    from harness.tuning.study import Study


class RunFailed(Exception):
    """A seed's run ended with status failed, nan or oom, or without a final score: the trial fails, the study goes on."""


def seed_scores(t) -> dict[int, float]:
    """seed -> final score of a trial's finished seeds (from its user attrs)."""
    return {int(k): v for k, v in (t.user_attrs.get("seed_scores") or {}).items()}


def run_trial(trial: optuna.Trial, study: Study, cfg: RunConfig, device, on_step) -> float | list[float]:
    """cfg: the trial's config (its first seed's folder is locked by the caller: the whole trial's lock)."""
    spec, seeds = study.spec, study.trial_seeds
    steps, prunable = cfg.train.steps, len(spec.objectives) == 1
    configs = [cfg.model_copy(update={"seed": seed}) for seed in seeds]
    trial.set_user_attr("seed_runs", {str(c.seed): c.run_id for c in configs})
    curves: dict[int, dict[int, float]] = {}  # seed -> training step -> eval/reward
    scores: dict[int, float] = {}
    summaries: list[dict] = []
    reported: list[float] = []  # what the pruner saw, last

    def report(k: int, step: int, value: float) -> float:
        curves[seeds[k]][step] = value
        mean = statistics.fmean(curves[s][step] for s in seeds[:k + 1] if step in curves[s])
        trial.report(mean, k * steps + step)
        reported.append(mean)
        return mean

    def replay(k: int, run_dir: Path, upto: int) -> None:
        """Report the run's logged evaluations up to step `upto` that are not reported yet."""
        for row in read_metrics(run_dir):
            if "eval/reward" in row and 0 < row["step"] <= upto and row["step"] not in curves[seeds[k]]:
                report(k, row["step"], row["eval/reward"])

    for k, c in enumerate(configs):
        run_dir = study.run_dir(c.run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        curves[c.seed] = {}
        if prunable:  # a finished or resumed run's evaluations so far, for the pruner's comparisons
            replay(k, run_dir, steps if is_finished(run_dir) else _saved_step(run_dir))

        def progress(step, total, reward, eval, k=k):
            on_step(step=k * steps + step, total=steps * len(seeds), reward=reward, eval=eval, trial=trial.number)
            if prunable and eval is not None:
                mean = report(k, step, eval)
                if step < total and trial.should_prune():  # at its last step the run's score is known: nothing to save
                    over = f"mean over seeds {', '.join(map(str, seeds[:k + 1]))}" if k else f"seed {seeds[0]}"
                    raise Pruned(f"eval/reward {mean:.3f} ({over}) at step {step} of {total}")

        summary = _train(c, run_dir, device, progress)
        if prunable:  # evaluations no progress call reported (a run in its own process): the pruner sees them between seeds
            replay(k, run_dir, steps)
        summaries.append(summary)
        _record(trial, summaries)
        if summary["status"] == "pruned":
            raise optuna.TrialPruned(summary["error"])
        if summary["status"] != "ok":
            raise RunFailed(f"seed {c.seed}: {summary['status']}: {summary['error']}")
        scores[c.seed] = _score(study, c, run_dir)
        trial.set_user_attr("seed_scores", {str(s): x for s, x in scores.items()})
        if prunable and reported and k + 1 < len(seeds) and trial.should_prune():  # before the next seed costs anything
            done = ", ".join(map(str, seeds[:k + 1]))
            error = f"eval/reward {reported[-1]:.3f} (mean over seeds {done}) at the end of seed {c.seed}"
            trial.set_user_attr("status", "pruned")
            trial.set_user_attr("error", error)
            raise optuna.TrialPruned(error)
    values = []
    for objective in spec.objectives:
        if objective == "eval_reward":
            values.append(statistics.fmean(scores[s] for s in seeds))
        else:
            memory = [x.get("peak_memory_gib") for x in summaries]
            if any(m is None for m in memory):
                raise RunFailed("a seed's run finished without peak_memory_gib")
            values.append(max(memory))
    return values[0] if len(values) == 1 else values


def _saved_step(run_dir: Path) -> int:
    from harness.models import checkpoint

    return checkpoint.saved_step(run_dir)


def _train(cfg: RunConfig, run_dir: Path, device, progress) -> dict:
    from harness.execution.isolation import in_own_process, own_process_needed
    from harness.execution.lifecycle import run_one

    if is_finished(run_dir):  # these parameters and this seed ran before (a retried trial, or a seed already done)
        return read_json(run_dir / "summary.json")
    if own_process_needed(cfg, device):  # colocated vLLM on CUDA: no per-step reports from the child
        return in_own_process(run_one, cfg, run_dir, device)
    return run_one(cfg, run_dir, device, progress)


def _score(study: Study, cfg: RunConfig, run_dir: Path) -> float:
    """The verdicts' final score of a run that trained to the end."""
    from harness.results.verdict import judge_run

    v = judge_run(run_dir, cfg.seed, study.criteria, cfg.kl_in_loss)
    if not v.trained_to_end or not finite(v.eval_final):
        raise RunFailed(f"seed {cfg.seed}: the run has no final score ({v.verdict}: {v.reason})")
    return v.eval_final


def _record(trial: optuna.Trial, summaries: list[dict]) -> None:
    """The trial's facts over the seeds run so far: the last run's status and error, steps and
    wall time summed, the largest peak memory, the mean first and last evals."""
    last = summaries[-1]
    got = lambda key: [x[key] for x in summaries if x.get(key) is not None]  # noqa: E731
    trial.set_user_attr("status", last.get("status"))
    trial.set_user_attr("error", last.get("error"))
    trial.set_user_attr("steps_completed", sum(got("steps_completed")))
    trial.set_user_attr("wall_s", sum(got("wall_s")) if got("wall_s") else None)
    trial.set_user_attr("peak_memory_gib", max(got("peak_memory_gib"), default=None))
    for key in ("eval_start", "eval_end"):
        trial.set_user_attr(key, statistics.fmean(got(key)) if got(key) else None)


class SecondCopy(RunFailed):
    """This worker was handed a trial another worker ran and reported: optuna refuses this one's report."""


def holder_is_another_trial(trial: optuna.Trial, run_id: str) -> bool:
    """Whether the folder's lock is held by another trial with the same parameters, or by this very trial: optuna on
    SQLite can hand one queued trial (the matrix's values) to two workers at once (SQLite has no SELECT FOR UPDATE).
    A holder sets its run_id before it locks, so another trial holding the lock is visible here."""
    return any(t.number != trial.number and t.user_attrs.get("run_id") == run_id
               for t in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def await_the_other_copy(trial: optuna.Trial, run_dir: Path, tell_within_s: float = 60.0) -> bool:
    """This worker holds a second copy of a trial another worker is running: wait for that run to end and the other
    worker to report it, so that its result stands. Failing here first would mark the trial failed and make the
    other worker's report raise (optuna: "Trial#0 has already finished and can not be updated")."""
    with locked(run_dir / ".lock"):  # the other copy's run has ended when its lock is free
        pass
    storage, deadline = trial.study._storage, time.monotonic() + tell_within_s
    while not (done := storage.get_trial(trial._trial_id).state.is_finished()) and time.monotonic() < deadline:
        time.sleep(0.2)  # polls the event (the report), bounded in case the other worker died before making it
    return done
