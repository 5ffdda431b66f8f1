"""Text from data (labels, axis values, errors, what models generate) made safe to print through rich."""

from __future__ import annotations

import re

from rich.markup import escape

# C0 and C1 control characters but newline and tab: ESC starts terminal escape sequences, CR overwrites a line
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text: object) -> str:
    """`text` with its control characters (but newline and tab) shown as \\xNN: for reports and logs."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def printable(text: object) -> str:
    """`text` as rich markup that prints it literally: markup escaped, control characters shown as \\xNN."""
    return escape(visible(text))


def number(x: float | None, digits: int = 3, *, signed: bool = False, none: str = "–") -> str:
    """`x` with `digits` decimals (and its sign, `signed`), or `none` for None: a number in a table or a log line."""
    if x is None:
        return none
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def significant(x: object, digits: int = 4, *, none: str = "–") -> str:
    """A float in `digits` significant digits, any other value (an int, a choice) as str, `none` for None:
    a searched parameter's value or an objective's."""
    if x is None:
        return none
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)
