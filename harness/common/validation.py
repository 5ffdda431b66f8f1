"""A pydantic ValidationError as the harness words a problem: one line per error, naming the field."""

from __future__ import annotations

import typing

from pydantic import BaseModel, ValidationError


def validation_problems(error: ValidationError, root: type[BaseModel]) -> list[str]:
    """Each error as "dotted.field: what is wrong (got VALUE)"; an unknown field's lists the valid ones (of `root`,
    the model validated, or the nested model the field is in); a rule across fields names its fields itself."""
    return [_problem(err, root) for err in error.errors()]


def _problem(err: dict, root: type[BaseModel]) -> str:
    msg = _msg(err, root)
    value = err.get("input")
    scalar = isinstance(value, (str, int, float, bool))
    if err["type"] != "extra_forbidden" and scalar and not err["type"].startswith("value_error"):
        shown = repr(value) if not isinstance(value, bool) else str(value).lower()
        msg += f" (got {shown[:60]})"
    return f"{'.'.join(str(x) for x in err['loc'])}: {msg}" if err["loc"] else msg


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
        kinds = typing.get_args(field.annotation) or (field.annotation,)
        nested = [a for a in kinds if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return sorted(model.model_fields)
