"""`harness`: the command line, a thin layer over harness.api. Each module registers its commands
on the one Typer app (harness.cli.app), in the order `--help` lists them; importing this package
imports them all, and no torch."""

from harness.cli import runs, tables, info, tune, engine, seeds  # noqa: F401, I001  (each registers its commands)
from harness.cli.app import app

__all__ = ["app"]
