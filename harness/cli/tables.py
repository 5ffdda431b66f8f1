"""`harness table`: a sweep's results as a table file, for people who analyse them elsewhere."""

from __future__ import annotations

from pathlib import Path

import typer

from harness import api
from harness.cli.app import RESULTS, app, console, fail, failing
from harness.common.text import printable

KINDS = ("steps", "runs", "cells")
FORMATS = ("csv", "parquet", "json")


@app.command()
def table(
    matrix: str = typer.Argument(..., help="The sweep: a matrix name (its results under --results) or a results folder."),
    kind: str = typer.Option("steps", help="steps: one row per logged step per run (every metric a column); "
                             "runs: one row per run (summary and verdict); cells: one row per cell (status and evidence)."),
    csv: Path | None = typer.Option(None, "--csv", help="Write the table as CSV to this file."),
    parquet: Path | None = typer.Option(None, "--parquet", help="Write it as Parquet (needs pyarrow)."),
    json: Path | None = typer.Option(None, "--json", help="Write it as JSON records."),
    results: Path = RESULTS,
):
    """Write a sweep's results as a table: the same DataFrames harness.steps / runs / cells return.

    Each row carries the cell's name, its axis values and the seed, so a table groups by any axis.
    Example: harness table smoke --kind steps --csv smoke_steps.csv"""
    from harness.results.tables import write

    if kind not in KINDS:
        raise fail(f"--kind {kind!r}: valid: {', '.join(KINDS)}")
    outputs = [(fmt, path) for fmt, path in zip(FORMATS, (csv, parquet, json)) if path is not None]
    if not outputs:
        raise fail("say where to write it: --csv FILE, --parquet FILE or --json FILE")
    with failing():
        df = getattr(api, kind)(matrix, results)
        for fmt, path in outputs:
            write(df, path, fmt)
            console.print(f"{printable(path)}: {len(df)} rows × {len(df.columns)} columns ({kind})")
