"""The errors the harness raises for problems a caller can fix. The CLI prints their message and
exits 2; a Python caller catches `HarnessError`. Each message names the file, the field or the
option, and the valid choices."""

from __future__ import annotations


class HarnessError(Exception):
    """A problem with what the harness was asked to do (not a bug in it)."""


class UsageError(HarnessError, ValueError):
    """An argument the harness cannot use: an unknown executor, a device, a cell, a seed, a status.
    `option` names the argument, and the message starts with it ("executor: unknown executor ..."),
    so the CLI can name its flag instead ("--executor: ...")."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


class SweepNotFound(HarnessError, FileNotFoundError):
    """A results folder that holds no sweep (no matrix.json)."""


class Unavailable(HarnessError, RuntimeError):
    """Something a run needs is not installed or not reachable: Ray, a Ray cluster, W&B, lm-eval."""
