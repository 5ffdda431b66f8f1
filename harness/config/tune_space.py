"""What a matrix's `tune:` declares: the search space, the objectives, the pruner, the storage
settings; and how a trial's parameters become an ordinary RunConfig.

Pure pydantic, no Optuna import: a matrix is validated (and `harness sweep --dry-run` works)
without the `tune` extra installed.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from harness.common.validation import validation_problems
from harness.config.dotted import set_dotted
from harness.config.run import Frozen, RunConfig

OBJECTIVES = {  # name -> (what a trial's value is, direction)
    "eval_reward": ("the mean over the trial's seeds of the verdicts' final score (verdict.judge_run's eval_final)", "maximize"),
    "peak_memory": ("the largest peak_memory_gib of the trial's seed runs", "minimize"),
}


class Param(Frozen):
    """One searched field: `choices` (categorical), or `low`/`high` (uniform; `log` for log-uniform,
    `int` for integers)."""

    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    int: bool = False

    @model_validator(mode="after")
    def _one_kind(self):
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.int:
                raise ValueError("give either choices, or low/high (with log/int), not both")
            if not self.choices:
                raise ValueError("choices: empty list")
            if not all(c is None or isinstance(c, (str, int, float, bool)) for c in self.choices):
                raise ValueError("choices must be numbers, strings, booleans or null (Optuna stores them as such)")
        elif self.low is None or self.high is None:
            raise ValueError("give choices: [...], or both low and high")
        elif not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        elif self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        return self

    def suggest(self, trial, name: str):
        if self.choices is not None:
            return trial.suggest_categorical(name, self.choices)
        if self.int:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def contains(self, value) -> bool:
        if self.choices is not None:
            return value in self.choices
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def extremes(self) -> list:
        return list(self.choices) if self.choices is not None else [self.low, self.high]


class Pruner(Frozen):
    name: Literal["median", "hyperband", "none"] = Field(
        "median", description="median: stop a trial whose eval/reward is below the median of earlier trials at the same step")
    startup_trials: int = Field(3, ge=0, description="median: finished trials needed before any pruning")
    warmup_steps: int = Field(0, ge=0, description="median: no pruning before this training step")
    min_resource: int | None = Field(None, ge=1, description="hyperband: fewest steps a trial gets (default: train.eval_every)")
    reduction_factor: int = Field(3, ge=2, description="hyperband: 1/factor of the trials go on at each rung")


DEFAULT_PARAMS = {
    "lora.r": Param(choices=[4, 8, 16, 32, 64]),
    "train.beta": Param(low=1e-3, high=0.3, log=True),
}


class TuneSpec(Frozen):
    params: dict[str, Param] = Field(default_factory=lambda: dict(DEFAULT_PARAMS),
                                     description="dotted RunConfig field -> distribution; replaces the default space when given")
    lora_alpha: Literal["ratio", "fixed"] = Field(
        "ratio", description="ratio: lora.alpha follows lora.r at the matrix's alpha/r; fixed: alpha stays as the matrix sets it")
    objectives: list[Literal["eval_reward", "peak_memory"]] = Field(
        ["eval_reward"], min_length=1, description="eval_reward (maximize); add peak_memory (minimize) for a Pareto front")
    pruner: Pruner = Pruner()
    sampler: Literal["tpe", "random"] = "tpe"
    startup_trials: int = Field(5, ge=0, description="tpe: trials sampled at random before the model-based search")
    trials: int = Field(20, ge=1, description="trials a study runs in all, when --trials is not given")
    seed: int = Field(0, description="sampler seed; worker k of a study uses seed + k")
    heartbeat_s: int = Field(60, ge=1, description="RDB storage: a running trial silent for 2x this is stale, failed and retried")
    max_retries: int = Field(2, ge=0, description="times a killed or interrupted trial is re-run with the same parameters")
    seeds_per_trial: int = Field(
        1, ge=1, le=64,
        description="seeds each trial trains (the matrix's seeds in order, then the next integers): the objective is the mean "
                    "over them of the verdicts' final score. With 1 no two trials can be told apart; the report resolves a "
                    "difference only when its one-sided bounds at criteria.confidence exclude 0. Costs this many runs a trial")

    @model_validator(mode="after")
    def _check(self):
        known = RunConfig.model_fields
        for name in self.params:
            top, _, rest = name.partition(".")
            if top not in known or (rest and rest not in _nested_fields(top)):
                raise ValueError(f"params.{name}: not a RunConfig field (e.g. lora.r, train.beta, train.lr)")
            if name == "seed":
                raise ValueError("params.seed: seeds are not tuned; a trial runs the cell's first seeds_per_trial seeds")
        if self.lora_alpha == "ratio" and "lora.alpha" in self.params:
            raise ValueError("params.lora.alpha is searched, so lora_alpha must be `fixed`, not `ratio`")
        if self.objectives not in (["eval_reward"], ["eval_reward", "peak_memory"]):
            raise ValueError("objectives: [eval_reward] or [eval_reward, peak_memory]: "
                             "eval/reward is what is pruned on and ranked first")
        if len(self.objectives) > 1 and self.pruner.name != "none":
            raise ValueError("Optuna prunes single-objective studies only: with two objectives set pruner: {name: none}")
        return self

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o][1] for o in self.objectives]


def trial_seeds(matrix_seeds, n: int) -> tuple[int, ...]:
    """The seeds every trial trains, in order: the first n of the matrix's (a cell's `runs[i].seed`),
    then the integers after the largest of them when the matrix lists fewer than n."""
    seeds = list(dict.fromkeys(matrix_seeds))[:n]
    nxt = max(seeds, default=-1) + 1
    while len(seeds) < n:
        seeds.append(nxt)
        nxt += 1
    return tuple(seeds)


def _nested_fields(top: str) -> set[str]:
    annotation = RunConfig.model_fields[top].annotation
    return set(getattr(annotation, "model_fields", {}))


def trial_config(cell_cfg: RunConfig, spec: TuneSpec, params: dict[str, Any]) -> RunConfig:
    """The cell's config with a trial's parameters set (and lora.alpha following lora.r)."""
    tree = copy.deepcopy(cell_cfg.model_dump(mode="json"))
    for name, value in params.items():
        set_dotted(tree, name, value)
    if spec.lora_alpha == "ratio" and "lora.r" in params:
        tree["lora"]["alpha"] = params["lora.r"] * cell_cfg.lora.alpha / cell_cfg.lora.r
    return RunConfig.model_validate(tree)


def defaults(cell_cfg: RunConfig, spec: TuneSpec) -> dict[str, Any]:
    """The cell's own values of the searched fields: the study's first trial."""
    tree = cell_cfg.model_dump(mode="json")
    out = {}
    for name in spec.params:
        node = tree
        for part in name.split("."):
            node = node[part]
        out[name] = node
    return out


def check_space(cell_cfg: RunConfig, spec: TuneSpec) -> list[str]:
    """Every problem with the space for this cell: a value of the space that makes an invalid
    config, found before any trial trains."""
    problems = []
    for name, param in spec.params.items():
        for value in param.extremes():
            try:
                trial_config(cell_cfg, spec, {name: value})
            except ValidationError as e:
                problems.append(f"tune.params.{name} = {value!r}: {'; '.join(validation_problems(e, RunConfig))}")
    return problems


def binomial_se(p: float | None, n: int) -> float | None:
    """Standard error of an accuracy p measured on n held-out prompts."""
    return None if p is None or not 0 <= p <= 1 else math.sqrt(p * (1 - p) / n)
