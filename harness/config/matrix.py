"""Matrix YAML -> validated cells -> RunConfigs.

A matrix is `base` (a partial RunConfig) + `axes` (lists whose product gives the cells) + `seeds`
+ `exclude`/`include` + `baseline` (the cell every other is judged against) + `criteria`.
Every cell is validated before anything runs, and every problem is reported at once: a sweep
that dies on cell 17 after an hour of training is the failure this module exists to prevent.
"""

from __future__ import annotations

import collections
import copy
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from harness.common.validation import validation_problems
from harness.config.dotted import get_dotted, set_dotted
from harness.config.matrix_checks import exclude_patterns, excluded, key_problem, max_runs_problem, size_problems
from harness.config.preflight import check_run
from harness.config.run import SEED_MAX, Frozen, RunConfig
from harness.config.seeds import AdaptiveSeeds, Seeds
from harness.config.strict_yaml import YamlProblem, load_yaml, parse_yaml
from harness.config.tune_space import TuneSpec
from harness.errors import HarnessError
from harness.evals.lm_eval import LmEvalSettings
from harness.evals.lm_eval import precheck as lm_eval_precheck
from harness.results.folders import folder_name
from harness.tracking.wandb import WandbSettings

AXIS_ALIASES = {"colocation": "rollout.colocation"}
MAX_SHOWN = 40  # problems listed; the rest are counted


class MatrixError(HarnessError, ValueError):
    def __init__(self, path: Path | str, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_SHOWN] + ([f"... and {len(problems) - MAX_SHOWN} more"] if len(problems) > MAX_SHOWN else [])
        super().__init__(f"{path}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in shown))


class Criteria(Frozen):
    """Verdict thresholds. They belong to the matrix, never to code: a table is judged by what it states.

    Why each rule looks the way it does (with the curves behind it) is in the README, "Verdicts"."""

    min_gain: float = Field(0.05, ge=0, le=1, description="held-out gain (final score - step-0 eval/reward) "
                            "that counts as learning")
    final_window: float = Field(0.25, gt=0, le=1, description="the final score is the mean of the evals in this last fraction "
                                "of training (steps >= (1 - final_window) x last step); one eval is too noisy to judge on")
    kl_max: float = Field(1.0, gt=0, description="diverged when the rolling median of `kl` over kl_window steps exceeds this "
                          "(recipes with a KL term in their loss only); single steps above it are counted as spikes, not judged")
    kl_window: int = Field(10, ge=1, description="steps in the rolling median of `kl`: long enough that one heavy-tailed k3 "
                           "estimate cannot move it, short enough to catch a sustained rise")
    drop_max: float = Field(0.15, gt=0, le=1, description="diverged when the final score and the last eval are both more "
                            "than this below the run's best eval/reward: held-out reward collapsed and did not recover")
    entropy_floor: float = Field(0.02, ge=0, description="final entropy under this while not learning: collapsed")
    tolerance: float = Field(0.05, gt=0, le=1, description="how far below the baseline's final score still counts "
                             "as non-inferior")
    confidence: float = Field(0.9, gt=0.5, lt=1, description="confidence of the one-sided bounds on Δ and of the "
                              "reported intervals")
    power: float = Field(0.8, gt=0.5, lt=1, description="for an Inconclusive cell: the chance that the suggested seed "
                         "count decides it")
    min_seeds: int = Field(2, ge=2, description="finished seeds a cell needs for a verdict; fewer give 'Smoke tested'")
    score: Literal["greedy", "avg"] = Field("greedy", description="what every eval in the verdicts is: greedy, eval/reward "
                                            "(one greedy completion per held-out prompt); avg, eval/avg@k (the mean reward "
                                            "of k sampled ones, pass@1; needs eval.samples k > 0 in every cell)")


class Tracking(Frozen):
    """Where runs are mirrored besides their own metrics.jsonl (which verdicts read)."""

    wandb: WandbSettings | None = Field(None, description="one W&B run per harness run, grouped by matrix; offline by default")


class EvalSpec(Frozen):
    """Evaluations of each run's final policy after it trains, on top of its own held-out eval/reward."""

    lm_eval: LmEvalSettings | None = Field(None, description="lm-evaluation-harness tasks, e.g. the harness's own qrl_arith")


class MatrixSpec(Frozen):
    description: str = ""
    base: dict[str, Any] = {}
    axes: dict[str, list[Any]] = {}
    seeds: Seeds = Field([0], description="a list of distinct seeds, every cell runs once per seed; "
                                              "or {min, max, step}: adaptive, seeds added to undecided cells")
    exclude: list[dict[str, Any]] = []
    include: list[dict[str, Any]] = []
    baseline: dict[str, Any] = {}
    criteria: Criteria = Criteria()
    tune: TuneSpec = TuneSpec()  # what `harness tune` searches for a cell of this matrix
    tracking: Tracking = Tracking()
    eval: EvalSpec = EvalSpec()

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int] | AdaptiveSeeds) -> list[int] | AdaptiveSeeds:
        if isinstance(seeds, AdaptiveSeeds):
            return seeds
        if not seeds:
            raise ValueError("empty: list at least one seed, e.g. seeds: [0]")
        twice = sorted(s for s, n in collections.Counter(seeds).items() if n > 1)
        if twice:
            raise ValueError(f"seed {', '.join(map(str, twice))} listed twice: each seed is one run of every cell; "
                             "list distinct seeds")
        return seeds

    @model_validator(mode="after")
    def _enough_seeds(self):
        first = self.looks[0]
        if "min_seeds" in self.criteria.model_fields_set and self.criteria.min_seeds > first:
            listed = f"seeds.min {first}" if isinstance(self.seeds, AdaptiveSeeds) else f"the {first} seed(s) listed"
            raise ValueError(f"criteria.min_seeds {self.criteria.min_seeds} is more than {listed}: "
                             "every cell would be Smoke tested; list more seeds or lower min_seeds")
        return self

    @property
    def seed_list(self) -> list[int]:
        """Every seed a cell may run, in the order rounds add them."""
        return self.seeds.seeds if isinstance(self.seeds, AdaptiveSeeds) else list(self.seeds)

    @property
    def looks(self) -> list[int]:
        """Seeds per cell at each look: one look, at every listed seed, for a plain list."""
        return self.seeds.looks if isinstance(self.seeds, AdaptiveSeeds) else [len(self.seeds)]


@dataclass(frozen=True)
class Cell:
    key: dict[str, Any]  # dotted field -> value: the axis values, plus any overrides of an `include`
    label: str | None
    included: bool  # came from `include:` rather than the product of the axes
    runs: tuple[RunConfig, ...]  # one per seed the cell may run (seeds.max of an adaptive matrix), in round order
    seed_offset: int = 0  # an include's `seed_offset`: its seeds are the matrix's plus this (an A/A cell's other seeds)

    @property
    def name(self) -> str:
        text = ",".join(f"{k}={v}" for k, v in self.key.items())
        return f"{text} ({self.label})" if self.label else text


@dataclass(frozen=True)
class Matrix:
    name: str
    path: Path
    spec: MatrixSpec
    cells: tuple[Cell, ...]

    @property
    def axes(self) -> list[str]:
        return [AXIS_ALIASES.get(k, k) for k in self.spec.axes]

    def baseline_of(self, cell: Cell) -> Cell | None:
        if not self.spec.baseline:
            return None
        want = {k: cell.key[k] for k in self.axes} | {AXIS_ALIASES.get(k, k): v for k, v in self.spec.baseline.items()}
        return next((c for c in self.cells if not c.included and c.key == want), None)

    def select(self, expr: str) -> list[Cell]:
        """Cells matching "quant=nf4,lora.r=8": the cell whose key is exactly that if there is
        one (so "quant=bf16" is the bf16 cell, not also a bf16 variant from `include`), else
        every cell with those values. A field that is not an axis ("algorithm=grpo" where
        algorithm is set in `base`) is compared with the cell's configuration."""
        want = parse_assignments(expr)

        def value(cell: Cell, field: str):
            if field in cell.key:
                return cell.key[field]
            return get_dotted(cell.runs[0].model_dump(mode="json"), field)

        matching = [c for c in self.cells if all(value(c, k) == v for k, v in want.items())]
        exact = [c for c in matching if set(c.key) == set(want)]
        return exact or matching

    def to_json(self, planned: dict[str, int] | None = None, looks_k: int | None = None) -> dict:
        """matrix.json: each cell with the runs planned so far (`planned`: cell name -> seeds; default
        every seed of a plain list, the first look of adaptive seeds), which verdicts and reports read;
        `looks_k`: the looks the error is split over (results.looks.spread_over), default these looks."""
        looks = self.spec.looks
        return {
            "name": self.name,
            "source": self.path.read_text(),
            "description": self.spec.description,
            "axes": self.axes,
            "baseline": self.spec.baseline,
            "criteria": self.spec.criteria.model_dump(),
            "looks": looks,
            "looks_k": max(looks_k or 0, len(looks)),
            "adaptive": isinstance(self.spec.seeds, AdaptiveSeeds),
            "cells": [
                {
                    "name": c.name,
                    "key": c.key,
                    "label": c.label,
                    "included": c.included,
                    "baseline": (b.name if (b := self.baseline_of(c)) else None),
                    "runs": [{"seed": r.seed, "run_id": r.run_id, "kl_in_loss": r.kl_in_loss}
                             for r in c.runs[:(planned or {}).get(c.name, looks[0])]],
                }
                for c in self.cells
            ],
        }


def parse_assignments(expr: str) -> dict[str, Any]:
    out = {}
    for part in filter(None, (p.strip() for p in expr.split(","))):
        k, sep, v = part.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {part!r}")
        out[AXIS_ALIASES.get(k.strip(), k.strip())] = parse_yaml(v.strip())  # YamlProblem (a ValueError) on bad YAML
    return out


def find_matrix(name_or_path: str, matrices_dir: Path = Path("matrices")) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = matrices_dir / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(x.stem for x in matrices_dir.glob("*.yaml"))
    if p.is_dir():
        raise FileNotFoundError(f"{name_or_path} is a directory, not a matrix: give a matrix file (matrices/NAME.yaml) "
                                f"or a name; known: {', '.join(known)}")
    import difflib

    close = difflib.get_close_matches(name_or_path, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise FileNotFoundError(f"no matrix {name_or_path!r} (looked for {candidate}).{hint} Known: {', '.join(known)}")


def _yaml_of(path: Path):
    """The file's YAML (config.strict_yaml's loader); its problems as a MatrixError naming the file."""
    try:
        return load_yaml(path)
    except YamlProblem as e:
        raise MatrixError(path, [str(e)]) from None


def load_matrix(path: Path | str) -> Matrix:
    path = Path(path)
    raw = _yaml_of(path)
    if raw is None or raw == {}:
        raise MatrixError(path, ["the file is empty: a matrix needs at least `base:` (a run config) or `axes:`; "
                                 "see matrices/smoke.yaml"])
    if not isinstance(raw, dict):
        fields = ", ".join(MatrixSpec.model_fields)
        raise MatrixError(path, [f"(top level): expected a mapping with {fields}; got {type(raw).__name__}"])
    try:
        spec = MatrixSpec.model_validate(raw)
    except ValidationError as e:
        raise MatrixError(path, validation_problems(e, MatrixSpec)) from None
    try:
        name = folder_name(path.stem)
    except ValueError as e:
        raise MatrixError(path, [f"(file name): {e}; rename the file"]) from None
    return Matrix(name, path, spec, tuple(_expand(path, spec)))


def _expand(path: Path, spec: MatrixSpec) -> list[Cell]:
    problems: list[str] = []
    axes = {AXIS_ALIASES.get(k, k): v for k, v in spec.axes.items()}
    spec_axes = list(axes)
    fatal = [p for k in axes if (p := key_problem(f"axes.{k}", k))]  # these would fail every cell, or the expansion itself
    if "seed" in axes:  # fatal: the cells would differ in a value every run then overrides
        fatal.append("axes.seed: seeds are not an axis; list them under `seeds:`")
    if "seed" in spec.base:
        problems.append("base.seed: seeds are listed under `seeds:`, not in `base`")
    for k, values in axes.items():
        if not values:
            problems.append(f"axes.{k}: empty list")
    for k, v in spec.baseline.items():
        k = AXIS_ALIASES.get(k, k)
        if k not in axes:
            problems.append(f"baseline.{k}: not an axis of this matrix; axes: {', '.join(spec_axes) or '(none)'}")
        elif v not in axes[k]:
            problems.append(f"baseline.{k}: {v!r} is not among axes.{k} {axes[k]}")
    seeds = spec.seed_list
    fatal += max_runs_problem() + size_problems(spec.base, axes, spec.include, len(seeds))
    excludes = exclude_patterns([{AXIS_ALIASES.get(k, k): v for k, v in ex.items()} for ex in spec.exclude], axes, problems)
    includes = []
    for i, inc in enumerate(spec.include):
        inc = {AXIS_ALIASES.get(k, k): v for k, v in inc.items()}
        label = inc.pop("label", None)
        if label is not None and not isinstance(label, str):
            problems.append(f"include[{i}].label: expected text, got {label!r}")
        offset = inc.pop("seed_offset", 0)
        if type(offset) is not int or offset < 0 or max(seeds) + offset > SEED_MAX:
            problems.append(f"include[{i}].seed_offset: expected a whole number from 0 that keeps every seed at most "
                            f"{SEED_MAX}, got {offset!r}")
            offset = 0
        if "seed" in inc:
            fatal.append(f"include[{i}].seed: seeds are not set per cell; list them under `seeds:`")
        fatal += [p for k in inc if (p := key_problem(f"include[{i}].{k}", k))]
        includes.append((i, inc, label, offset))
    if fatal:
        raise MatrixError(path, list(dict.fromkeys(fatal + problems)))

    keys: list[tuple[dict[str, Any], str | None, bool, int]] = []
    for combo in itertools.product(*axes.values()):
        key = dict(zip(axes, combo))
        if not excluded(key, excludes):
            keys.append((key, None, False, 0))
    if spec.exclude and axes and not keys and not includes:
        problems.append(f"exclude: removes all {math.prod(map(len, axes.values()))} cells of the axes and `include` adds none: "
                        "nothing would run; remove the exclude entries that match everything")
    for i, inc, label, offset in includes:
        key = {k: inc.get(k, get_dotted(spec.base, k)) for k in axes} | {k: v for k, v in inc.items() if k not in axes}
        missing = [k for k in axes if key[k] is None]
        if missing:
            problems.append(f"include[{i}]: sets no value for axis {', '.join(missing)} and `base` has none")
            continue
        keys.append((key, label, True, offset))

    cells, seen, cache, runs_of = [], {}, {}, {}
    for key, label, included, offset in keys:
        tag = (",".join(f"{k}={v}" for k, v in key.items()) or "(base: no axes)") + (f" ({label})" if label else "")
        merged = copy.deepcopy(spec.base)
        try:
            for k, v in key.items():
                set_dotted(merged, k, v)
            merged["seed"] = seeds[0] + offset
            first = RunConfig.model_validate(merged)
        except ValidationError as e:
            problems += [f"cell {tag}: {p}" for p in validation_problems(e, RunConfig)]
            continue
        except ValueError as e:  # set_dotted through a value; key_problem catches the cases it knows first
            problems.append(f"cell {tag}: {e}")
            continue
        problems += [f"cell {tag}: {p}" for p in check_run(first, cache)]
        if spec.criteria.score == "avg" and not first.eval.samples:
            problems.append(f"cell {tag}: criteria.score: avg judges eval/avg@k, which a run logs only with eval.samples k > 0; "
                            "set eval.samples (e.g. base: {eval: {samples: 8}}) or score: greedy")
        # the other seeds differ in the seed alone, which MatrixSpec validated as RunConfig would
        runs = (first, *(first.model_copy(update={"seed": seed + offset}) for seed in seeds[1:]))
        if first.run_id in seen:
            problems.append(f"cell {tag}: same configuration as cell {seen[first.run_id]}")
        else:  # a seed_offset that moves a copy's seeds onto another cell's would compare runs with themselves
            shared = next((r for r in runs if r.run_id in runs_of), None)
            if shared is not None:
                problems.append(f"cell {tag}: its seed {shared.seed} is the same run as {runs_of[shared.run_id]} (same "
                                "configuration and seed); give it a seed_offset past every seed the matrix runs "
                                f"(at least {max(seeds) + 1})")
        seen[first.run_id] = tag
        runs_of.update({r.run_id: f"cell {tag} seed {r.seed}" for r in runs})
        cells.append(Cell(key, label, included, runs, offset))
    if spec.eval.lm_eval is not None and cells:
        tasks = {}
        for c in cells:
            tasks.setdefault(c.runs[0].task.name, c.name or "(base: no axes)")
        problems += lm_eval_precheck(spec.eval.lm_eval.tasks, tasks)
    if problems:
        raise MatrixError(path, list(dict.fromkeys(problems)))
    return cells


def load_run_config(path: Path | str) -> RunConfig:
    """One run's config file (the fields of a matrix's `base`, plus `seed`), checked as a matrix's cells are."""
    path = Path(path)
    raw = _yaml_of(path)
    if not raw or not isinstance(raw, dict):
        got = "the file is empty" if not raw else f"got {type(raw).__name__}"
        raise MatrixError(path, [f"(top level): {got}; a run config is a mapping of {', '.join(RunConfig.model_fields)}"])
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise MatrixError(path, validation_problems(e, RunConfig)) from None
    problems = check_run(cfg)
    if problems:
        raise MatrixError(path, problems)
    return cfg


