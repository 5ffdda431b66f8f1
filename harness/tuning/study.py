"""`harness tune`: an Optuna study over one cell of a matrix.

Each trial trains the cell's config with the trial's parameters once per seed (`tune.seeds_per_trial`,
the seeds in order), each an ordinary run written to results/<matrix>/tune/<study>/<run_id>/ like
any run. The mean over its seeds of the verdicts' final score (and the largest peak memory, when
asked) is the objective; harness/tuning/trial.py runs the seeds and says how the pruner sees them.

Several worker processes, here or on other machines, share one study through its storage.
A trial's fate is read from the storage, not from any one worker:
- done: finished, pruned, or failed *cleanly* (the run wrote a summary with status failed, nan or
  oom; it is recorded and the study goes on: the same parameters would fail again);
- lost: failed without a summary (the worker was killed, interrupted or crashed). With an RDB
  storage a killed worker's trial goes stale after 2 x heartbeat_s; either way a lost trial is
  queued again with the same parameters, up to `max_retries` times, and its run resumes from its
  last checkpoint (same parameters, same run_id, same folder).
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from pydantic import ValidationError

from harness.common.files import locked, replacing
from harness.common.text import significant
from harness.common.validation import validation_problems
from harness.config.matrix import Criteria
from harness.config.run import RunConfig
from harness.config.tune_space import TuneSpec, defaults, trial_config, trial_seeds
from harness.errors import HarnessError
from harness.tuning.trial import RunFailed, SecondCopy, await_the_other_copy, holder_is_another_trial, run_trial

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)  # each worker prints its own line per trial


class StudyMismatch(HarnessError, ValueError):
    """The stored study was made for another cell configuration or search space."""


@dataclass(frozen=True)
class Study:
    """All a worker needs (picklable: workers are spawned processes)."""

    name: str
    storage: str  # an RDB URL (sqlite:///..., postgresql://...) or a journal file path
    matrix: str
    cell: str
    cell_cfg: RunConfig  # the cell's first seed: the configuration a trial changes
    spec: TuneSpec
    trials: int
    root: Path  # results/<matrix>/tune/<study>/
    seeds: tuple[int, ...] = ()  # the cell's seeds (cell.runs[i].seed); a trial trains the first spec.seeds_per_trial
    criteria: Criteria = Criteria()  # the matrix's: final_window scores a run, confidence compares trials

    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    @property
    def trial_seeds(self) -> tuple[int, ...]:
        return trial_seeds(self.seeds or (self.cell_cfg.seed,), self.spec.seeds_per_trial)


def shown(storage: str) -> str:
    """The storage as reports and logs show it: without a password."""
    if "://" not in storage:
        return storage
    from sqlalchemy.engine import make_url

    return make_url(storage).render_as_string(hide_password=True)


def default_storage(results: Path, matrix: str) -> str:
    return f"sqlite:///{results / matrix / 'tune' / 'optuna.db'}"  # relative: the report names no machine's path


def _storage(study: Study):
    if "://" not in study.storage:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(study.storage).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(study.storage))
    if study.storage.startswith("sqlite:///"):
        Path(study.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(
        study.storage,
        # several workers write one sqlite file: wait for its lock rather than fail
        engine_kwargs={"connect_args": {"timeout": 120}} if study.storage.startswith("sqlite") else None,
        heartbeat_interval=study.spec.heartbeat_s,
        grace_period=2 * study.spec.heartbeat_s,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=study.spec.max_retries),
    )


def _sampler(spec: TuneSpec, worker: int, session: int = 0):
    """Seeded by (tune.seed, worker, host, trials already in the study): a resumed or extended
    study, or a worker on another machine, draws new points instead of replaying earlier ones."""
    seed = int(hashlib.sha256(f"{spec.seed}:{worker}:{socket.gethostname()}:{session}".encode()).hexdigest()[:8], 16)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: a worker's running trials count as bad guesses for the others, so parallel
    # workers do not all sample around the same point
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials, constant_liar=True)


def _pruner(study: Study):
    p, t = study.spec.pruner, study.cell_cfg.train
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource or t.eval_every,
                                              max_resource=t.steps * len(study.trial_seeds),  # a trial's steps over its seeds
                                              reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def load(study: Study, worker: int = 0) -> optuna.Study:
    s = optuna.load_study(study_name=study.name, storage=_storage(study), pruner=_pruner(study))
    s.sampler = _sampler(study.spec, worker, len(s.get_trials(deepcopy=False)))
    return s


def create(study: Study) -> tuple[optuna.Study, list[str]]:
    """Create the study or load it (refusing one made for another cell or space); queue the
    cell's own values as the first trial. Returns notes for the user."""
    identity = {"cell_config": study.cell_cfg.model_dump(mode="json"), "tune": _meaning(study.spec.model_dump(mode="json")),
                "score": _score(study)}
    s = optuna.create_study(study_name=study.name, storage=_storage(study), directions=study.spec.directions, load_if_exists=True,
                            sampler=_sampler(study.spec, 0), pruner=_pruner(study))
    notes = []
    if "cell_config" not in s.user_attrs:
        for key, value in (identity | {"matrix": study.matrix, "cell": study.cell}).items():
            s.set_user_attr(key, value)
        first = defaults(study.cell_cfg, study.spec)
        outside = [k for k, v in first.items() if not study.spec.params[k].contains(v)]
        if outside:
            notes.append(f"the cell's own {', '.join(f'{k}={first[k]}' for k in outside)} is outside the search space: "
                         "not queued")
        else:
            s.enqueue_trial(first, user_attrs={"queued": "the matrix's values"}, skip_if_exists=True)
    else:
        stored = s.user_attrs | {"tune": _meaning(s.user_attrs.get("tune", {}))}
        changed = [k for k, v in identity.items() if stored.get(k) != v]
        if changed:
            why = (" (it predates scoring a trial by the verdicts' final score over its seeds)"
                   if "score" in changed and "score" not in stored else "")
            raise StudyMismatch(f"study {study.name!r} in {shown(study.storage)} was made with another {' and '.join(changed)}"
                                f"{why}; give --study a new name (or delete the study) to search this one")
    return s, notes


def _score(study: Study) -> dict:
    """What a trial's objective is computed from: its seeds, and the final window of the verdicts' score (and which
    eval that is, where not the greedy one: criteria.score, left out at its default so older studies still match)."""
    score = {} if study.criteria.score == "greedy" else {"eval": study.criteria.score}
    return {"seeds": list(study.trial_seeds), "final_window": study.criteria.final_window} | score


def _meaning(tune: dict) -> dict:
    """The tune settings that change what a trial means; trials, heartbeat_s and max_retries may
    change between sessions of one study."""
    return {k: v for k, v in tune.items() if k not in ("trials", "heartbeat_s", "max_retries")}


def requeue_lost(s: optuna.Study, max_retries: int) -> list[int]:
    """Queue again every lost trial not yet queued again. Run by the parent before any worker
    starts, so two workers never queue the same one; stale RDB trials are queued by Optuna."""
    trials = s.get_trials(deepcopy=False)
    retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    out = []
    for t in trials:
        if _lost(t) and t.number not in retried and len(RetryHeartbeatStaleTrialCallback.retry_history(t)) < max_retries:
            RetryHeartbeatStaleTrialCallback(max_retry=max_retries)(s, t)
            out.append(t.number)
    return out


def _lost(t) -> bool:
    return t.state == TrialState.FAIL and "status" not in t.user_attrs and not t.user_attrs.get("surplus")


def _counts(t) -> bool:
    """A trial that used one of the study's N slots (or is using one)."""
    return not _lost(t) and not t.user_attrs.get("surplus") and t.state != TrialState.WAITING


def tally(s: optuna.Study) -> dict[str, int]:
    trials = s.get_trials(deepcopy=False)
    return {
        "done": sum(_counts(t) and t.state.is_finished() for t in trials),
        "running": sum(t.state == TrialState.RUNNING for t in trials),
        "waiting": sum(t.state == TrialState.WAITING for t in trials),
        "lost": sum(_lost(t) for t in trials),
    }


def work(study: Study, worker: int, device: str, on_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None,
         on_step: Callable[..., None] | None = None, threads: int | None = None) -> None:
    """Run trials until the study has `study.trials` done, then return. Trials running in other
    workers are waited for (they finish, or go stale and are queued again here)."""
    from transformers.utils import logging as hf_logging

    from harness.common.system import pick_device

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per trial would break up the study's output
    if threads:
        torch.set_num_threads(threads)
    if device in ("auto", "cuda") and torch.cuda.device_count() > 1:  # local workers spread over the visible GPUs
        device = f"cuda:{worker % torch.cuda.device_count()}"
    dev = pick_device(device)
    s = load(study, worker)
    on_trial = on_trial or (lambda t: print(trial_line(t, worker), flush=True))
    while True:
        optuna.storages.fail_stale_trials(s)
        fail_dead_local(s, study.spec.max_retries)
        n = tally(s)
        if n["done"] >= study.trials:
            return
        if n["done"] + n["running"] >= study.trials:  # the rest are running elsewhere
            if "://" not in study.storage:  # a journal file has no heartbeat: another host's dead worker can't be told apart
                print(f"worker {worker}: {n['running']} trial(s) still marked running elsewhere; stopping", flush=True)
                return
            time.sleep(min(study.spec.heartbeat_s, 5))
            continue
        copies: list[int] = []

        def run(trial: optuna.Trial) -> float | list[float]:
            try:
                return objective(trial, study, dev, on_step or (lambda **kw: None))
            except SecondCopy:
                copies.append(trial.number)
                raise

        try:
            s.optimize(run, n_trials=1, catch=(RunFailed,), callbacks=[lambda _, t: on_trial(t)])
        except ValueError:  # optuna: "Cannot tell a COMPLETE trial": a second copy's report, refused; the first's stands
            if not copies:
                raise


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_dead_local(s: optuna.Study, max_retries: int) -> None:
    """Fail and queue again the running trials of workers on this host whose process is gone
    (what heartbeats do for RDB storages, for a journal file too, and without the grace period)."""
    host = socket.gethostname()
    for t in s.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        who, _, pid = t.user_attrs.get("worker", "").rpartition(":")
        if who != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            s._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker got there first
            continue
        RetryHeartbeatStaleTrialCallback(max_retry=max_retries)(s, s._storage.get_trial(t._trial_id))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def objective(trial: optuna.Trial, study: Study, device: torch.device, on_step: Callable[..., None]) -> float | list[float]:
    spec = study.spec
    trial.set_user_attr("worker", _worker_id())
    # checking the count and creating the trial are two steps: a trial past the study's N gives its slot up
    before = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number and _counts(t)]
    if len(before) >= study.trials:
        trial.set_user_attr("surplus", True)
        raise RunFailed(f"surplus: the study already has its {study.trials} trials")
    params = {name: p.suggest(trial, name) for name, p in spec.params.items()}
    try:
        cfg = trial_config(study.cell_cfg, spec, params)
    except ValidationError as e:  # a combination of values the space allows but a run config does not
        error = "; ".join(validation_problems(e, RunConfig))
        trial.set_user_attr("status", "invalid")
        trial.set_user_attr("error", error[:2000])
        raise RunFailed(f"invalid config: {error}") from None
    run_dir = study.run_dir(cfg.run_id)
    trial.set_user_attr("run_id", cfg.run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    # two trials with the same parameters (or a worker taken for dead while still alive) must not train into one folder;
    # the first seed's folder locks all the trial's seeds
    with locked(run_dir / ".lock", wait=False) as mine:
        if mine:
            return run_trial(trial, study, cfg, device, on_step)
    if not holder_is_another_trial(trial, cfg.run_id) and await_the_other_copy(trial, run_dir):
        raise SecondCopy("a second copy of this trial, which another worker ran and reported")
    error = f"another trial is running the same configuration ({cfg.run_id})"
    trial.set_user_attr("status", "busy")
    trial.set_user_attr("error", error)
    raise RunFailed(error)


def trial_line(t: optuna.trial.FrozenTrial, worker: int | None = None) -> str:
    params = " ".join(f"{k}={significant(v, none='None')}" for k, v in t.params.items())
    who = f" (worker {worker})" if worker is not None else ""
    if t.state == TrialState.COMPLETE:
        outcome = "→ " + ", ".join(f"{v:.4g}" for v in t.values)
    else:
        outcome = f"{t.state.name.lower()}: {t.user_attrs.get('error') or ''}".rstrip(": ")
    return f"trial {t.number}{who}: {params} {outcome} [{t.user_attrs.get('run_id', '?')}]"


def best_trials(s: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The best trial (one objective) or the Pareto front, highest eval/reward first."""
    if not any(t.state == TrialState.COMPLETE for t in s.get_trials(deepcopy=False)):
        return []
    front = s.best_trials if len(s.directions) > 1 else [s.best_trial]
    return sorted(front, key=lambda t: -t.values[0])


def apply(matrix_path: Path, cell_key: dict[str, Any], study: Study, trial: optuna.trial.FrozenTrial, out: Path) -> Path:
    """Write a copy of the matrix with the trial's parameters as a new `include:` cell (the cell's
    axis values plus the parameters, labelled with the study and trial), keeping the original's
    text and comments. Refuses to overwrite; checks that the new cell is exactly the trial's config."""
    import yaml

    from harness.config.matrix import MatrixError, load_matrix

    if out.exists():
        raise FileExistsError(f"{out} exists; pass --out with a new path (nothing is overwritten)")
    cfg = trial_config(study.cell_cfg, study.spec, trial.params)
    if cfg.run_id == study.cell_cfg.run_id:
        raise ValueError(f"trial {trial.number} ran the matrix's own values {trial.params}: "
                         "the matrix already is the best found; nothing to apply")
    entry = dict(cell_key) | dict(trial.params)
    if study.spec.lora_alpha == "ratio" and "lora.r" in trial.params:
        entry["lora.alpha"] = cfg.lora.alpha
    values = ", ".join(f"{o} {v:.4g}" for o, v in zip(study.spec.objectives, trial.values))
    entry["label"] = f"tuned: study {study.name}, trial {trial.number}"
    item = yaml.safe_dump([entry], sort_keys=False, default_flow_style=False, allow_unicode=True)
    note = f"# from `harness tune` study {study.name!r}, trial {trial.number} ({values})\n"
    source = matrix_path.read_text()
    header = (f"# make sweep MATRIX={out.stem}   (or: harness sweep {out.stem})\n"
              f"# {matrix_path.name} with the best parameters of `harness tune` study {study.name!r} as an included cell,\n"
              f"# judged against the same baseline as the original cells.\n")
    lines = source.splitlines(keepends=True)
    at = next((i for i, line in enumerate(lines) if line.split("#")[0].rstrip() == "include:"), None)
    if at is None and any(line.startswith("include:") for line in lines):
        raise ValueError(f"{matrix_path}: write its `include:` as a block list (one `- ...` item per line) "
                         "so a cell can be added")
    if at is None:
        text = header + source.rstrip("\n") + "\n\ninclude:\n" + _indent(note + item, "  ")
    else:
        nxt = next((line for line in lines[at + 1:] if line.strip() and not line.lstrip().startswith("#")), "  -")
        text = (header + "".join(lines[:at + 1]) + _indent(note + item, nxt[:len(nxt) - len(nxt.lstrip())])
                + "".join(lines[at + 1:]))
    with replacing(out, keep=True) as tmp:  # renamed to `out` once it validates; kept beside it when it does not
        tmp.write_text(text)
        try:
            cells = load_matrix(tmp).cells
        except MatrixError as ex:
            raise ValueError(f"the tuned matrix does not validate (kept at {tmp} for inspection): {ex}") from None
        new = [c for c in cells if c.label == entry["label"]]
        if len(cells) != len(load_matrix(matrix_path).cells) + 1:
            raise ValueError(f"the tuned matrix does not keep every cell of {matrix_path} (kept at {tmp} for inspection)")
        if len(new) != 1 or new[0].runs[0].model_dump(exclude={"seed"}) != cfg.model_dump(exclude={"seed"}):
            raise ValueError(f"the tuned matrix's new cell is not the trial's configuration (kept at {tmp} for inspection)")
    return out


def _indent(text: str, prefix: str) -> str:
    return "".join(prefix + line if line.strip() else line for line in text.splitlines(keepends=True))
