"""Verdicts and reports on results folders that the tests write with the real writers.

The numbers are planted; the files (metrics.jsonl, samples.jsonl, summary.json, matrix.json)
come from the same JsonlTracker and writers a real run uses, so they cannot drift from them.
"""

import json

import pytest

from harness.common.files import write_json_atomic
from harness.config.matrix import Criteria
from harness.reports import write_report
from harness.results.layout import read_metrics
from harness.results.verdict import CELL_VERDICTS, RUN_VERDICTS, judge, judge_run
from harness.tracking.files import JsonlTracker

from synthetic import fake_run, plant, write_sweep

MATRIX = """\
# make sweep MATRIX=v
axes: {quant: [bf16, nf4, int8, fp4]}
seeds: [0, 1, 2]
include:
  - {quant: bf16, train.lr: 0.0, label: control}
  - {quant: nf4, train.lr: 0.0, label: broken}
  - {quant: int8, train.lr: 0.0, label: half}
  - {quant: bf16, lora.r: 8, label: one seed}
  - {quant: fp4, lora.r: 8, label: too big}
  - {quant: int8, lora.r: 4, label: noisy}
  - {quant: nf4, lora.r: 8, label: random weights}
baseline: {quant: bf16}
criteria: {min_gain: 0.05, tolerance: 0.05, kl_max: 1.0, entropy_floor: 0.05, confidence: 0.9, min_seeds: 2}
"""


@pytest.fixture
def sweep(tmp_path):
    return write_sweep(tmp_path, MATRIX)


def test_every_run_and_cell_verdict(sweep):
    root, runs = sweep
    plant(runs, "quant=bf16", [0.55, 0.56, 0.54])
    plant(runs, "quant=nf4", [0.53, 0.54, 0.52])  # 0.02 below: non-inferior within 0.05
    plant(runs, "quant=int8", [0.47, 0.47, 0.46])  # learns, 0.08 below: beyond tolerance
    fake_run(runs["quant=fp4"][0], 0.4, 0.55)
    fake_run(runs["quant=fp4"][1], 0.4, 0.40, nan_at=4)  # planted NaN
    fake_run(runs["quant=fp4"][2], 0.4, 0.55, kl=2.5)  # KL above the bound
    fake_run(runs["quant=bf16,lora.r=8 (one seed)"][0], 0.4, 0.55)  # seeds 1 and 2 missing: fewer than min_seeds
    plant(runs, "quant=bf16,train.lr=0.0 (control)", [0.40, 0.40, 0.41])
    fake_run(runs["quant=nf4,train.lr=0.0 (broken)"][0], 0.4, 0.4, status="oom", error="OutOfMemoryError: CUDA out of memory")
    fake_run(runs["quant=nf4,train.lr=0.0 (broken)"][1], 0.4, 0.4, status="failed", error="RuntimeError: boom")
    fake_run(runs["quant=nf4,train.lr=0.0 (broken)"][2], 0.4, 0.39, entropy=0.01)  # entropy collapse, no learning
    fake_run(runs["quant=bf16"][0].parent / "killed", 0.4, 0.4, status="killed", error="killed by SIGKILL")  # not a cell's run
    for d in runs["quant=fp4,lora.r=8 (too big)"]:  # what the memory pre-check writes instead of launching
        write_json_atomic(d / "summary.json", {"status": "infeasible",
                                               "error": "needs about 90.00 GiB (estimate), 80.00 GiB available",
                                               "memory_estimate": {"peak_gib": 89.5, "fit_gib": 90.0}})
    plant(runs, "quant=int8,lora.r=4 (noisy)", [0.62, 0.53, 0.44], start=0.30)  # Δ -0.02 but sd 0.09: neither shown
    # the "half" cell never ran
    for d in runs["quant=nf4,lora.r=8 (random weights)"]:  # a `shape:` model (env.json): learning or not, not judged
        fake_run(d, 0.0, 0.3)
        write_json_atomic(d / "env.json", {"model": {"name": "shape:qwen2.5-1.5b", "random_weights": True}})

    cells = {c.name: c for c in judge(root)}
    status = {n: c.status for n, c in cells.items()}
    assert status == {
        "quant=bf16": "Converges",
        "quant=nf4": "Converges",
        "quant=int8": "Convergence issue",
        "quant=fp4": "Convergence issue",
        "quant=bf16,lora.r=8 (one seed)": "Smoke tested",
        "quant=bf16,train.lr=0.0 (control)": "Does not converge",
        "quant=nf4,train.lr=0.0 (broken)": "Error",
        "quant=int8,train.lr=0.0 (half)": "Incomplete",
        "quant=fp4,lora.r=8 (too big)": "Infeasible",
        "quant=int8,lora.r=4 (noisy)": "Inconclusive",
        "quant=nf4,lora.r=8 (random weights)": "Not judged (random weights)",
    }
    assert set(status.values()) == set(CELL_VERDICTS)

    run_verdicts = {r.verdict for c in cells.values() for r in c.runs}
    assert run_verdicts == set(RUN_VERDICTS)
    fp4 = cells["quant=fp4"].runs
    assert fp4[1].verdict == "diverged" and "non-finite loss at step 4" in fp4[1].reason
    assert (fp4[2].verdict == "diverged"
            and "kl rolling median over 10 steps above kl_max 1.0 from step 10 (largest 1.275)" in fp4[2].reason)
    broken = cells["quant=nf4,train.lr=0.0 (broken)"].runs
    assert [r.verdict for r in broken] == ["oom", "failed", "collapsed"]
    assert "entropy 0.01 under entropy_floor 0.05" in broken[2].reason
    # the crashed seeds' last evals are not final ones: the cell's final eval/reward is the collapsed seed's alone
    assert cells["quant=nf4,train.lr=0.0 (broken)"].eval_final_mean == pytest.approx(0.39)
    too_big = cells["quant=fp4,lora.r=8 (too big)"]
    assert "90.00 GiB" in too_big.reason and too_big.runs[0].memory_estimate_gib == 89.5
    killed = judge_run(runs["quant=bf16"][0].parent / "killed", 0, Criteria())
    assert killed.verdict == "failed" and "SIGKILL" in killed.reason

    nf4, int8 = cells["quant=nf4"], cells["quant=int8"]
    assert nf4.delta_vs_baseline == pytest.approx(-0.02) and nf4.delta_lower_bound > -0.05
    assert "non-inferior" in nf4.reason and nf4.test.startswith("paired")
    assert int8.delta_upper_bound < -0.05 and "shown worse than the baseline" in int8.reason
    assert "fewer than min_seeds 2" in cells["quant=bf16,lora.r=8 (one seed)"].reason
    shape = cells["quant=nf4,lora.r=8 (random weights)"]
    assert [r.verdict for r in shape.runs] == ["not_judged"] * 3 and shape.delta_vs_baseline is None
    assert "shape:qwen2.5-1.5b has random weights" in shape.reason
    saved = json.loads((root / "verdicts.json").read_text())
    assert [c["status"] for c in saved] == list(status.values())


def test_noisy_cell_is_inconclusive_and_says_how_many_seeds(sweep):
    """Same mean gap as a passing cell, but seeds scattered: the bounds, not the mean, decide; they straddle
    -tolerance, so the cell is neither non-inferior nor worse, and the reason says what would decide it."""
    root, runs = sweep
    plant(runs, "quant=bf16", [0.55, 0.55, 0.55])
    plant(runs, "quant=nf4", [0.62, 0.53, 0.44], start=0.30)  # mean 0.53 (Δ -0.02), sd 0.09
    nf4 = {c.name: c for c in judge(root)}["quant=nf4"]
    assert nf4.delta_vs_baseline == pytest.approx(-0.02)
    assert nf4.delta_lower_bound < -0.05 < nf4.delta_upper_bound
    assert nf4.status == "Inconclusive"
    # paired sd 0.09, margin |-0.02 + 0.05| = 0.03; (t_.9 + t_.8 at n-1 df) x 0.09 / sqrt(n) is
    # (1.3031 + 0.8500) x 0.09 / sqrt(41) = 0.03027 > 0.03 and (1.3025 + 0.8497) x 0.09 / sqrt(42) = 0.02990 <= 0.03
    assert nf4.seeds_to_decide == 42 and "about 42 seeds per cell would likely decide it" in nf4.reason


def test_report_escapes_what_runs_wrote(sweep, tmp_path):
    root, runs = sweep
    plant(runs, "quant=bf16", [0.55, 0.56, 0.54], completion="<script>document.title='pwned'</script>")
    fake_run(runs["quant=nf4"][0], 0.4, 0.6, status="failed", error="ValueError: bad <b>html</b> | pipe")
    judge(root)
    write_report(root, tmp_path / "reports" / "v")
    text = (tmp_path / "reports" / "v" / "report.md").read_text()
    assert "<b>" not in text and "&lt;b&gt;" in text and "\\| pipe" in text
    page = (tmp_path / "reports" / "v" / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;document.title" in page
    assert "<b>html" not in page


ALGORITHMS = """\
axes: {algorithm: [grpo, sft], quant: [bf16, nf4]}
seeds: [0, 1]
baseline: {quant: bf16}
criteria: {min_gain: 0.05, tolerance: 0.05, kl_max: 1.0, entropy_floor: 0.05, confidence: 0.9, min_seeds: 2}
"""


def test_report_has_one_column_per_algorithm(tmp_path):
    root, runs = write_sweep(tmp_path, ALGORITHMS, name="alg")
    plant(runs, "algorithm=grpo,quant=bf16", [0.60, 0.62])
    plant(runs, "algorithm=grpo,quant=nf4", [0.61, 0.62])
    plant(runs, "algorithm=sft,quant=bf16", [0.90, 0.92])
    plant(runs, "algorithm=sft,quant=nf4", [0.41, 0.40])  # learns nothing: each algorithm judged against its own bf16
    judge(root)
    write_report(root, tmp_path / "reports" / "alg")
    lines = (tmp_path / "reports" / "alg" / "report.md").read_text().splitlines()
    head = lines.index("### By algorithm") + 2
    assert lines[head] == "| Quantization · colocation | GRPO | SFT |"
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[head + 2:head + 4]}
    assert set(rows) == {"bf16", "nf4"}  # planted runs have no config.json: an unknown colocation is left out
    assert "Converges, 0.615" in rows["nf4"] and "Does not converge, 0.405" in rows["nf4"]
    assert rows["bf16"].count("Converges") == 2
    page = (tmp_path / "reports" / "alg" / "report.html").read_text()
    assert "<table id='by-algorithm'>" in page and page.count("<th>SFT</th>") == 1


EXCLUDED_BASELINE = """\
axes: {quant: [bf16, nf4], lora.r: [8, 64]}
seeds: [0, 1, 2]
exclude: [{quant: bf16, lora.r: 64}]
baseline: {quant: bf16}
criteria: {min_gain: 0.05, tolerance: 0.05, confidence: 0.9, min_seeds: 2}
"""


def test_a_cell_whose_baseline_is_excluded_is_not_called_converges(tmp_path):
    """Same runs, same gain: with its baseline the nf4 cell is far below it; without one it must not
    pass on its own gain (a matrix that excludes bf16 for a model too big for it)."""
    root, runs = write_sweep(tmp_path, EXCLUDED_BASELINE)
    plant(runs, "quant=bf16,lora.r=8", [0.80, 0.81, 0.80])
    plant(runs, "quant=nf4,lora.r=8", [0.46, 0.46, 0.47])
    plant(runs, "quant=nf4,lora.r=64", [0.46, 0.46, 0.47])
    cells = {c.name: c for c in judge(root)}
    assert cells["quant=nf4,lora.r=8"].status == "Convergence issue"
    orphan = cells["quant=nf4,lora.r=64"]
    assert orphan.status == "Smoke tested" and "baseline cell is excluded" in orphan.reason and orphan.delta_vs_baseline is None


def test_seeds_are_paired_only_when_both_cells_finished_the_same_ones(sweep):
    """Pairing the two shared seeds would drop nf4's worst seed and call it non-inferior (Δ +0.005)."""
    root, runs = sweep
    plant(runs, "quant=bf16", [0.55, 0.56, None])  # seed 2 not finished yet
    plant(runs, "quant=nf4", [0.55, 0.57, 0.46])
    nf4 = {c.name: c for c in judge(root)}["quant=nf4"]
    assert nf4.test.startswith("Welch") and nf4.delta_vs_baseline == pytest.approx(0.5267 - 0.555, abs=1e-3)
    assert nf4.status == "Inconclusive"


def test_a_stopped_seed_has_no_final_eval_and_a_seed_without_evals_is_not_missing(sweep):
    root, runs = sweep
    plant(runs, "quant=bf16", [0.80, 0.81, 0.80])
    fake_run(runs["quant=fp4"][0], 0.4, 0.80)
    fake_run(runs["quant=fp4"][1], 0.4, 0.81)
    fake_run(runs["quant=fp4"][2], 0.4, 0.41, nan_at=7, status="nan", error="NonFinite: loss at step 7")
    plant(runs, "quant=nf4", [0.80, 0.81])
    JsonlTracker(runs["quant=nf4"][2]).finish({"status": "ok"})  # finished, never evaluated: no sweep reruns it
    cells = {c.name: c for c in judge(root)}
    fp4 = cells["quant=fp4"]
    assert fp4.runs[2].eval_end == 0.41 and fp4.eval_final_mean == pytest.approx(0.805), (
        "the NaN-stopped seed's step-5 eval is not final")
    nf4 = cells["quant=nf4"]
    assert nf4.runs[2].verdict == "no_learning" and "learning not shown" in nf4.runs[2].reason
    assert nf4.status == "Convergence issue"


def test_mean_curves_survive_a_seed_that_has_not_run(sweep, tmp_path):
    from harness.reports.html import _mean_curve

    root, runs = sweep
    plant(runs, "quant=bf16", [0.55, 0.56, None])
    curves = {d.name: read_metrics(d) for d in runs["quant=bf16"]}
    mean = dict(_mean_curve(curves, "eval/reward"))
    assert mean == pytest.approx({0: 0.40, 10: 0.555})


def test_notes_written_by_a_person_survive_regeneration(sweep, tmp_path):
    root, runs = sweep
    plant(runs, "quant=bf16", [0.55, 0.56, 0.54])
    judge(root)
    out = tmp_path / "reports" / "v"
    out.mkdir(parents=True)
    (out / "notes.md").write_text("Measured on a 2-core CPU in 6m02s; <b>bold</b> claims escaped in HTML.\n")
    for _ in range(2):
        write_report(root, out)
    text = (out / "report.md").read_text()
    assert text.count("Measured on a 2-core CPU in 6m02s") == 1 and text.index("Measured") < text.index("| Workflow")
    page = (out / "report.html").read_text()
    assert "in 6m02s; &lt;b&gt;bold&lt;/b&gt;" in page
