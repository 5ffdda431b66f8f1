"""Matrix YAML -> validated cells -> RunConfigs.

A matrix is `base` (a partial RunConfig) + `axes` (lists whose product gives the cells) + `seeds`
+ `exclude`/`include` + `baseline` (the cell every other is judged against) + `criteria`.
Every cell is validated before anything runs, and every problem is reported at once: a sweep
that dies on cell 17 after an hour of training is the failure this module exists to prevent.
"""

from __future__ import annotations

import copy
import itertools
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from harness.config import Frozen, RunConfig, set_dotted
from harness.lm_eval_run import LmEvalSettings
from harness.tracking_wandb import WandbSettings
from harness.tune_space import TuneSpec

AXIS_ALIASES = {"colocation": "rollout.colocation"}


class MatrixError(ValueError):
    def __init__(self, path: Path | str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


class Criteria(Frozen):
    """Verdict thresholds. They belong to the matrix, never to code: a table is judged by what it states.

    Why each rule looks the way it does (with the curves behind it) is in the README, "Verdicts"."""

    min_gain: float = Field(0.05, ge=0, description="held-out gain (final score - step-0 eval/reward) that counts as learning")
    final_window: float = Field(0.25, gt=0, le=1, description="the final score is the mean of the evals in this last fraction "
                                "of training (steps >= (1 - final_window) x last step); one eval is too noisy to judge on")
    kl_max: float = Field(1.0, gt=0, description="diverged when the rolling median of `kl` over kl_window steps exceeds this "
                          "(recipes with a KL term in their loss only); single steps above it are counted as spikes, not judged")
    kl_window: int = Field(10, ge=1, description="steps in the rolling median of `kl`: long enough that one heavy-tailed k3 "
                           "estimate cannot move it, short enough to catch a sustained rise")
    drop_max: float = Field(0.15, gt=0, description="diverged when the final score and the last eval are both more than this "
                            "below the run's best eval/reward: held-out reward collapsed and did not recover")
    entropy_floor: float = Field(0.02, ge=0, description="final entropy under this while not learning: collapsed")
    tolerance: float = Field(0.05, gt=0, description="how far below the baseline's final score still counts as non-inferior")
    confidence: float = Field(0.9, gt=0.5, lt=1, description="confidence of the one-sided bounds on Δ and of the "
                              "reported intervals")
    power: float = Field(0.8, gt=0.5, lt=1, description="for an Inconclusive cell: the chance that the suggested seed "
                         "count decides it")
    min_seeds: int = Field(2, ge=2, description="finished seeds a cell needs for a verdict; fewer give 'Smoke tested'")


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
    seeds: list[int] = [0]
    exclude: list[dict[str, Any]] = []
    include: list[dict[str, Any]] = []
    baseline: dict[str, Any] = {}
    criteria: Criteria = Criteria()
    tune: TuneSpec = TuneSpec()  # what `harness tune` searches for a cell of this matrix
    tracking: Tracking = Tracking()
    eval: EvalSpec = EvalSpec()


@dataclass(frozen=True)
class Cell:
    key: dict[str, Any]  # dotted field -> value: the axis values, plus any overrides of an `include`
    label: str | None
    included: bool  # came from `include:` rather than the product of the axes
    runs: tuple[RunConfig, ...]  # one per seed

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
            node = cell.runs[0].model_dump(mode="json")
            for part in field.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            return node

        matching = [c for c in self.cells if all(value(c, k) == v for k, v in want.items())]
        exact = [c for c in matching if set(c.key) == set(want)]
        return exact or matching

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "source": self.path.read_text(),
            "description": self.spec.description,
            "axes": self.axes,
            "baseline": self.spec.baseline,
            "criteria": self.spec.criteria.model_dump(),
            "cells": [
                {
                    "name": c.name,
                    "key": c.key,
                    "label": c.label,
                    "included": c.included,
                    "baseline": (b.name if (b := self.baseline_of(c)) else None),
                    "runs": [{"seed": r.seed, "run_id": r.run_id, "kl_in_loss": r.kl_in_loss} for r in c.runs],
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
        out[AXIS_ALIASES.get(k.strip(), k.strip())] = yaml.safe_load(v.strip())
    return out


def find_matrix(name_or_path: str, matrices_dir: Path = Path("matrices")) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = matrices_dir / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(x.stem for x in matrices_dir.glob("*.yaml"))
    import difflib

    close = difflib.get_close_matches(name_or_path, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise FileNotFoundError(f"no matrix {name_or_path!r} (looked for {candidate}).{hint} Known: {', '.join(known)}")


def load_matrix(path: Path | str) -> Matrix:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MatrixError(path, [f"not valid YAML: {e}"]) from None
    try:
        spec = MatrixSpec.model_validate(raw)
    except ValidationError as e:
        raise MatrixError(path, [f"{_loc(err['loc'])}: {_msg(err, MatrixSpec)}" for err in e.errors()]) from None
    return Matrix(path.stem, path, spec, tuple(_expand(path, spec)))


def _expand(path: Path, spec: MatrixSpec) -> list[Cell]:
    problems: list[str] = []
    axes = {AXIS_ALIASES.get(k, k): v for k, v in spec.axes.items()}
    spec_axes = list(axes)
    if "seed" in axes:
        problems.append("axes.seed: seeds are not an axis; list them under `seeds:`")
    for k, values in axes.items():
        if not values:
            problems.append(f"axes.{k}: empty list")
    for k, v in spec.baseline.items():
        k = AXIS_ALIASES.get(k, k)
        if k not in axes:
            problems.append(f"baseline.{k}: not an axis of this matrix; axes: {', '.join(spec_axes)}")
        elif v not in axes[k]:
            problems.append(f"baseline.{k}: {v!r} is not among axes.{k} {axes[k]}")

    keys: list[tuple[dict[str, Any], str | None, bool]] = []
    for combo in itertools.product(*axes.values()):
        key = dict(zip(axes, combo))
        if not any(_matches(key, ex) for ex in spec.exclude):
            keys.append((key, None, False))
    for i, inc in enumerate(spec.include):
        inc = {AXIS_ALIASES.get(k, k): v for k, v in inc.items()}
        label = inc.pop("label", None)
        key = {k: inc.get(k, _get(spec.base, k)) for k in axes} | {k: v for k, v in inc.items() if k not in axes}
        missing = [k for k in axes if key[k] is None]
        if missing:
            problems.append(f"include[{i}]: sets no value for axis {', '.join(missing)} and `base` has none")
            continue
        keys.append((key, label, True))

    cells, seen = [], {}
    for key, label, included in keys:
        tag = ",".join(f"{k}={v}" for k, v in key.items())
        runs = []
        for seed in spec.seeds:
            merged = copy.deepcopy(spec.base)
            for k, v in key.items():
                set_dotted(merged, k, v)
            merged["seed"] = seed
            try:
                runs.append(RunConfig.model_validate(merged))
            except ValidationError as e:
                problems += [f"cell {tag}: {_loc(err['loc'])}: {_msg(err, RunConfig)}" for err in e.errors()]
                break
        else:
            if runs[0].run_id in seen:
                problems.append(f"cell {tag}: same configuration as cell {seen[runs[0].run_id]}")
            seen[runs[0].run_id] = tag
            cells.append(Cell(key, label, included, tuple(runs)))
    if problems:
        raise MatrixError(path, list(dict.fromkeys(problems)))
    return cells


def _matches(key: dict, pattern: dict) -> bool:
    return all(key.get(AXIS_ALIASES.get(k, k)) == v for k, v in pattern.items())


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _loc(loc: tuple) -> str:
    return ".".join(str(x) for x in loc) or "(top level)"


def _msg(err: dict, root: type[BaseModel]) -> str:
    if err["type"] == "extra_forbidden":
        fields = _fields_at(root, err["loc"][:-1])
        return f"unknown field; valid: {', '.join(fields)}"
    return err["msg"].removeprefix("Value error, ")


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        nested = [a for a in typing.get_args(field.annotation) or (field.annotation,) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return sorted(model.model_fields)
