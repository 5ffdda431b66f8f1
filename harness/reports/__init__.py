"""Reports for people: the Markdown and HTML verified-configuration tables and their plots.

write_report is the entry point; markdown.py builds the rows both formats show and the Markdown,
html.py the HTML page, plots.py its inline SVG charts."""

from __future__ import annotations

from pathlib import Path

from harness.common.files import write_atomic
from harness.reports.html import render_html
from harness.reports.markdown import cell_rows, load, write_markdown
from harness.reports.mismatch import mismatch_lines


def write_report(root: Path, out_dir: Path) -> Path:
    """Write report.md and report.html for the sweep at `root`; returns the Markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    matrix, cells = load(root)
    rows = cell_rows(root, matrix, cells)
    write_atomic(out_dir / "report.html", render_html(root, out_dir, matrix, cells, rows))
    # the verdicts with their evidence, beside the report: `harness compare reports/NAME results/NAME` checks a
    # fresh sweep against a committed reference, whose raw runs are not committed
    write_atomic(out_dir / "verdicts.json", (root / "verdicts.json").read_text())
    return write_markdown(root, out_dir, matrix, cells, rows, mismatch_lines(root, matrix, cells))
