"""report.md is valid CommonMark + GFM tables: every table a renderer would draw has as many cells in each
row as its delimiter row has columns (a header with an unescaped `|` made renderers drop the whole table)."""

import re
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from harness.reports import write_report
from harness.results.verdict import judge

from conftest import REPO
from synthetic import plant, write_sweep

DELIMITER = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")
ODD = """\
description: "a | pipe, a back\\\\slash | and `ticks`"
base: {task: {name: arith, eval_size: 50}}
axes: {quant: [bf16, nf4]}
baseline: {quant: bf16}
seeds: [0, 1]
include:
  - {quant: nf4, train.lr: 0.002, label: "a | b \\\\| c"}
"""


def cells(row: str) -> list[str]:
    """A table row's cells, split on the pipes GFM splits on (not those escaped with a backslash)."""
    return re.split(r"(?<!\\)\|", row.strip().removeprefix("|").removesuffix("|"))


def table_problems(text: str) -> list[str]:
    """Tables in `text` that a CommonMark + tables parser does not draw as written, and rows of the wrong width."""
    lines, fenced, candidates = text.splitlines(), False, []
    for i, line in enumerate(lines):
        fenced ^= line.startswith("```")
        if not fenced and i and DELIMITER.match(line) and lines[i - 1].startswith("|"):
            candidates.append(i)
    problems = []
    for i in candidates:
        width = len(cells(lines[i]))
        j = i - 1
        rows = [lines[j]]
        j = i + 1
        while j < len(lines) and lines[j].startswith("|"):
            rows.append(lines[j])
            j += 1
        problems += [f"line {i}: a row of {len(cells(r))} cells in a table of {width}: {r[:120]}"
                     for r in rows if len(cells(r)) != width]
    drawn = sum(t.type == "table_open" for t in MarkdownIt("commonmark").enable("table").parse(text))
    if drawn != len(candidates):
        problems.append(f"{len(candidates)} tables written, {drawn} drawn by markdown-it")
    return problems


def test_the_checker_catches_the_header_that_broke_the_engines_table():
    assert table_problems("| a | b |\n|---|---|\n| 1 | 2 |\n") == []
    assert table_problems("| a | |x| |\n|---|---|\n| 1 | 2 |\n")  # `|Δ logprob|` unescaped in a title
    assert table_problems("| a | b |\n|---|---|\n| 1 | 2 | 3 |\n")


def test_a_fresh_report_with_pipes_and_backslashes_in_its_labels(tmp_path):
    root, runs = write_sweep(tmp_path, ODD)
    for name, ends in zip(runs, ([0.8, 0.8], [0.7, 0.8], [0.6, 0.7])):
        plant(runs, name, ends)
    judge(root)
    text = write_report(root, tmp_path / "reports" / "v").read_text()
    assert "## Rollout engines" in text and r"\|Δ logprob\|" in text
    assert table_problems(text) == []


@pytest.mark.parametrize("path", sorted((REPO / "reports").rglob("*.md")), ids=lambda p: str(p.relative_to(REPO)))
def test_committed_reports(path: Path):
    assert table_problems(path.read_text()) == []
