"""A pydantic ValidationError as the harness words a problem: one line per error, naming the field."""

from __future__ import annotations

import typing

from pydantic import BaseModel, ValidationError

# The tags of discriminated unions (MatrixSpec.seeds: a list, or adaptive {min, max}): pydantic puts
# them in an error's location, but they are no field a user wrote
UNION_TAGS = frozenset({"list", "adaptive"})


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
    loc = [x for x in err["loc"] if x not in UNION_TAGS]
    return f"{'.'.join(str(x) for x in loc)}: {msg}" if loc else msg


def _msg(err: dict, root: type[BaseModel]) -> str:
    if err["type"] == "extra_forbidden":
        fields = _fields_at(root, [x for x in err["loc"][:-1] if x not in UNION_TAGS])
        return f"unknown field; valid: {', '.join(fields)}"
    return err["msg"].removeprefix("Value error, ")


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        nested = _models_in(field.annotation)
        if not nested:
            return []
        model = nested[0]
    return sorted(model.model_fields)


def _models_in(annotation) -> list[type[BaseModel]]:
    """The models an annotation holds, through Optional, unions and Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
