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
