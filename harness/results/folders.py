"""Folder names from data: a matrix's or config file's name becomes results/<name>/ and reports/<name>/."""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def folder_name(name: str) -> str:
    """A single, relative folder name: runs of characters other than letters, digits, `.`, `_` and `-`
    become `_`, and so do leading dots, so it is never `.`, `..`, hidden, absolute or nested (`...yaml`
    has the stem `..`: its sweep goes to results/__/). A name that was safe is unchanged. ValueError
    on an empty name."""
    safe = _UNSAFE.sub("_", name)
    safe = re.sub(r"^\.+", lambda m: "_" * len(m.group()), safe)
    if not safe:
        raise ValueError("an empty name cannot name a results folder")
    return safe
