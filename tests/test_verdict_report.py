"""Verdicts and the report on results folders written here by the real writers."""

import json

import pytest

from harness.matrix import load_matrix
from harness.report import write_report
from harness.results import write_json_atomic
from harness.tracking import JsonlTracker
from harness.verdict import judge

MATRIX = """\
# make sweep MATRIX=v
axes: {quant: [bf16, nf4, int8, fp4]}
seeds: [0, 1]
include: [{quant: bf16, train.lr: 0.0, label: control}]
baseline: {quant: bf16}
criteria: {min_gain: 0.05, tolerance: 0.05, kl_max: 1.0, entropy_floor: 0.05}
"""


def fake_run(run_dir, start, end, *, kl=0.1, entropy=0.5, status="ok", error=None, nan_at=None):
    """Write a run the way run_one does (the numbers are planted, the files are real)."""
    t = JsonlTracker(run_dir)
    t.log({"eval/reward": start}, 0)
    for step in range(1, 11):
        row = {"kl": kl, "entropy": entropy, "reward/mean": 0.5, "throughput/rollout_tokens_per_s": 1000.0}
        if step == nan_at:
            row["loss"] = float("nan")
        if step == 10:
            row["eval/reward"] = end
        t.log(row, step)
    t.finish({"status": status, "error": error, "peak_memory_gib": 0.5, "median_step_s": 0.1})


@pytest.fixture
def sweep_root(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text(MATRIX)
    m = load_matrix(path)
    root = tmp_path / "results" / "v"
    write_json_atomic(root / "matrix.json", m.to_json())
    runs = {c.name: [root / r.run_id for r in c.runs] for c in m.cells}
    return root, runs


def test_cell_and_run_verdicts(sweep_root, tmp_path):
    root, runs = sweep_root
    for d in runs["quant=bf16"]:
        fake_run(d, 0.40, 0.55)
    fake_run(runs["quant=nf4"][0], 0.38, 0.52)  # within tolerance of the baseline
    fake_run(runs["quant=nf4"][1], 0.38, 0.53)
    fake_run(runs["quant=int8"][0], 0.40, 0.46)  # learns, but 0.09 below the baseline
    fake_run(runs["quant=int8"][1], 0.40, 0.46)
    fake_run(runs["quant=fp4"][0], 0.40, 0.40, nan_at=4)
    # fp4 seed 1 never ran
    fake_run(runs["quant=bf16,train.lr=0.0 (control)"][0], 0.40, 0.40)
    fake_run(runs["quant=bf16,train.lr=0.0 (control)"][1], 0.40, 0.40, entropy=0.01)

    cells = {c.name: c for c in judge(root)}
    assert cells["quant=bf16"].status == "Converges"
    assert cells["quant=nf4"].status == "Converges" and cells["quant=nf4"].delta_vs_baseline == pytest.approx(-0.025)
    assert cells["quant=int8"].status == "Convergence issue" and "below the baseline" in cells["quant=int8"].reason
    assert cells["quant=fp4"].status == "Incomplete"
    assert [r.verdict for r in cells["quant=fp4"].runs] == ["diverged", "incomplete"]
    assert "non-finite loss at step 4" in cells["quant=fp4"].runs[0].reason
    control = cells["quant=bf16,train.lr=0.0 (control)"]
    assert control.status == "Does not converge"
    assert [r.verdict for r in control.runs] == ["no_learning", "collapsed"]
    assert json.loads((root / "verdicts.json").read_text())[0]["status"] == "Converges"


def test_errors_kl_and_escaping_in_report(sweep_root, tmp_path):
    root, runs = sweep_root
    for d in runs["quant=bf16"]:
        fake_run(d, 0.40, 0.55)
    fake_run(runs["quant=nf4"][0], 0.4, 0.6, kl=3.0)
    fake_run(runs["quant=nf4"][1], 0.4, 0.6)
    fake_run(runs["quant=int8"][0], 0.4, 0.6, status="failed", error="ValueError: bad <script>alert(1)</script> | x")
    fake_run(runs["quant=int8"][1], 0.4, 0.6)
    cells = {c.name: c for c in judge(root)}
    assert cells["quant=nf4"].status == "Convergence issue" and "kl 3 exceeds kl_max 1.0 at step 1" in cells["quant=nf4"].reason
    assert cells["quant=int8"].status == "Error"

    text = write_report(root, tmp_path / "reports" / "v").read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text and "\\| x" in text
    table = [line for line in text.splitlines() if line.startswith("| ") and "**" in line]
    assert len(table) == 5  # a row per cell
    assert "Convergence issue" in table[1] and "Error" in table[2]
