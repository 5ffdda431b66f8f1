"""The smoke matrix end to end: the acceptance claim of the foundation, checked from verdicts.json."""

import json
import statistics

import pytest

import harness


@pytest.mark.slow
def test_smoke_sweep_learns_and_the_control_does_not(tmp_path):
    """Through the Python API, as the README shows it: each run still trains in a process of its own."""
    result = harness.sweep("smoke", results=tmp_path / "results", reports=tmp_path / "reports", executor=harness.settings(jobs=2))
    assert result.statuses == {"ok": 8}, result.statuses
    cells = {c["name"]: c for c in json.loads((tmp_path / "results" / "smoke" / "verdicts.json").read_text())}
    assert {v.name: v.status for v in result.verdicts} == {n: c["status"] for n, c in cells.items()}
    table = harness.cells(result.plan).set_index("cell")
    assert table["status"].to_dict() == {n: c["status"] for n, c in cells.items()}, "the DataFrame says what verdicts.json says"
    gain = lambda name: statistics.fmean(r["gain"] for r in cells[name]["runs"])  # noqa: E731
    assert gain("quant=bf16") >= 0.05
    assert gain("quant=nf4") >= 0.05
    assert abs(gain("quant=bf16,train.lr=0.0 (zero-lr control)")) < 0.02
    assert cells["quant=bf16,train.lr=0.0 (zero-lr control)"]["status"] == "Does not converge"
    # issue 18's acceptance: the baseline converges, the quantized cells learn and are stable (non-inferiority
    # shown, or too few seeds to show it), and no learning cell is called broken
    assert cells["quant=bf16"]["status"] == "Converges"
    assert {cells[n]["status"] for n in ("quant=nf4", "quant=int8")} <= {"Converges", "Inconclusive"}
    for cell in cells.values():
        if all(r["gain"] is not None and r["gain"] > 0.3 for r in cell["runs"]):
            assert cell["status"] not in ("Does not converge", "Convergence issue"), cell["reason"]
    report = (tmp_path / "reports" / "smoke" / "report.md").read_text()
    assert "zero-lr control" in report and "Does not converge" in report
