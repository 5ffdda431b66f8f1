"""Checks on a matrix's shape made before its cells are expanded: keys that cannot name a field,
`exclude:` entries that would remove nothing (or everything), and a size (cells x seeds, and the
values copied into each cell) computed from the lengths of its lists, never by expanding them."""

from __future__ import annotations

import math
import os
import typing
from typing import Any

from pydantic import BaseModel

from harness.config.run import RunConfig

MAX_RUNS = 10_000  # cells x seeds; QRL_MAX_RUNS in the environment overrides it
MAX_WORK = 3_000_000  # cells x the YAML values copied into each cell's config: a few seconds of validation


def max_runs() -> int:
    value = os.environ.get("QRL_MAX_RUNS", "").strip()
    return int(value) if value.isdigit() else MAX_RUNS


def max_runs_problem() -> list[str]:
    value = os.environ.get("QRL_MAX_RUNS", "").strip()
    return [f"QRL_MAX_RUNS={value!r} (environment): expected a whole number of runs"] if value and not value.isdigit() else []


def key_problem(where: str, dotted: str) -> str | None:
    """Why a dotted key cannot name a RunConfig field (an unknown group, or a path through a value), or None.
    An unknown last part is left to RunConfig's own validation, which lists the valid fields."""
    model: type[BaseModel] = RunConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        field = model.model_fields.get(part)
        if field is None:
            return f"{where}: unknown field {part!r}; valid: {', '.join(sorted(model.model_fields))}"
        nested = [a for a in typing.get_args(field.annotation) or (field.annotation,)
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return (f"{where}: {'.'.join(parts[:i + 1])} is a single value, not a group of fields; "
                    f"write it as `{'.'.join(parts[:i + 1])}: VALUE`")
        model = nested[0]
    return None


def size_problems(base: dict, axes: dict[str, list], include: list[dict], n_seeds: int) -> list[str]:
    """The matrix's size, from the lengths of its lists, before anything is expanded."""
    product = math.prod(len(v) for v in axes.values())
    cells = product + len(include)
    runs, limit = cells * n_seeds, max_runs()
    if runs > limit:
        shape = " × ".join(f"{len(v)} {k}" for k, v in axes.items()) or "1"
        extra = f" + {len(include)} included" if include else ""
        return [(f"axes × seeds: the matrix makes {runs:,} runs ({shape}{extra} cells × {n_seeds} seeds), more than "
                 f"{limit:,}: shorten `axes` or `seeds`, or allow it with QRL_MAX_RUNS={runs} in the environment")]
    per_cell = _values(base) + sum(max(map(_values, v), default=0) for v in axes.values())
    per_cell += max((_values(inc) for inc in include), default=0)
    if cells * per_cell > MAX_WORK:
        return [(f"base: {_values(base):,} values copied into each of {cells:,} cells is more than this harness expands "
                 f"({MAX_WORK:,}); a run config holds about 60 values: is a list in `base` or `axes` much longer than meant?")]
    return []


def _values(tree) -> int:
    if isinstance(tree, dict):
        return 1 + sum(_values(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return 1 + sum(_values(v) for v in tree)
    return 1


def exclude_patterns(exclude: list[dict[str, Any]], axes: dict[str, list], problems: list[str]) -> dict[tuple[str, ...], set]:
    """`exclude:` as {axes it names: the frozen value tuples it removes}, after checking that every entry
    names axes only, with values among theirs (a misspelt key or value would silently remove nothing)."""
    out: dict[tuple[str, ...], set] = {}
    for i, ex in enumerate(exclude):
        if not ex:
            problems.append(f"exclude[{i}]: empty: it would remove every cell; name axis values, e.g. {{quant: nf4}}")
            continue
        bad = False
        for k, v in ex.items():
            if k not in axes:
                problems.append(f"exclude[{i}].{k}: not an axis of this matrix; axes: {', '.join(axes) or '(none)'}")
                bad = True
            elif v not in axes[k]:
                problems.append(f"exclude[{i}].{k}: {v!r} is not among axes.{k} {axes[k]}: it would remove nothing")
                bad = True
        if not bad:
            names = tuple(sorted(ex))
            out.setdefault(names, set()).add(tuple(_frozen(ex[k]) for k in names))
    return out


def excluded(key: dict, patterns: dict[tuple[str, ...], set]) -> bool:
    return any(tuple(_frozen(key[k]) for k in names) in values for names, values in patterns.items())


def _frozen(v):
    """A hashable stand-in with the same equality (lists compare as lists, dicts as dicts)."""
    if isinstance(v, dict):
        return ("dict", frozenset((k, _frozen(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return ("list", tuple(_frozen(x) for x in v))
    return v


