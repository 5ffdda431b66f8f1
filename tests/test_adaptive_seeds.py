"""Adaptive seeds (`seeds: {min, max, step}`): the matrix form, the rounds, the error control over
repeated looks (simulated against the README's table), and a real sweep on CPU killed and resumed."""

import re
from pathlib import Path

import pytest

import harness
from harness.config.matrix import AdaptiveSeeds, Criteria, MatrixError, load_matrix
from harness.execution.events import Started
from harness.results.intervals import Difference
from harness.results.looks import Look, look_at, next_round, resumed
from harness.results.simulate import Rates, simulate
from harness.results.verdict import RunVerdict, decide, judge_cell

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_looks_and_their_confidence():
    assert AdaptiveSeeds(min=3, max=12).looks == [3, 6, 9, 12]
    assert AdaptiveSeeds(min=4, max=10, step=4).looks == [4, 8, 10], "the last look is at max, even off the step"
    assert AdaptiveSeeds(min=5, max=5).looks == [5]
    assert look_at([3, 6, 9, 12], 6) == Look(2, 4) and look_at([3, 6, 9, 12], 7) == Look(2, 4)
    assert Look(2, 4).confidence(0.9) == pytest.approx(0.975), "each of 4 looks spends a quarter of the 10%"
    assert Look(1, 1).confidence(0.9) == pytest.approx(0.9), "a plain seed list: one look, as before"


def test_a_matrix_takes_adaptive_seeds_and_a_seed_offset(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("axes: {quant: [bf16]}\ninclude: [{quant: bf16, label: A/A, seed_offset: 100}]\n"
                    "seeds: {min: 2, max: 5}\nbaseline: {quant: bf16}\n")
    m = load_matrix(path)
    assert m.spec.looks == [2, 4, 5] and m.spec.seed_list == [0, 1, 2, 3, 4]
    assert [r.seed for r in m.cells[0].runs] == [0, 1, 2, 3, 4]
    assert [r.seed for r in m.cells[1].runs] == [100, 101, 102, 103, 104], "the A/A cell: other seeds, same config"
    saved = m.to_json()
    assert [len(c["runs"]) for c in saved["cells"]] == [2, 2] and saved["looks"] == [2, 4, 5] and saved["adaptive"]
    assert [len(c["runs"]) for c in m.to_json({"quant=bf16": 4})["cells"]] == [4, 2]

    for seeds, msg in (("{min: 4, max: 3}", "max 3 is less than min 4"), ("{min: 1, max: 3}", "seeds.min"),
                       ("{min: 2, max: 3, every: 1}", "every")):
        path.write_text(f"axes: {{quant: [bf16]}}\nseeds: {seeds}\n")
        with pytest.raises(MatrixError, match=msg):
            load_matrix(path)
    path.write_text("axes: {quant: [bf16]}\ninclude: [{quant: bf16, label: A/A, seed_offset: 2}]\nseeds: {min: 2, max: 4}\n")
    with pytest.raises(MatrixError, match=r"its seed 2 is the same run as cell quant=bf16 seed 2 .*at least 4"):
        load_matrix(path)  # the copy would be compared with the baseline's own runs
    path.write_text("axes: {quant: [bf16]}\ninclude: [{quant: bf16, label: x, seed_offset: -1}]\nseeds: [0]\n")
    with pytest.raises(MatrixError, match=r"include\[0\].seed_offset: expected a whole number"):
        load_matrix(path)
    path.write_text("axes: {quant: [bf16]}\nseeds: {min: 3, max: 6}\ncriteria: {min_seeds: 4}\n")
    with pytest.raises(MatrixError, match="min_seeds 4 is more than seeds.min 3"):
        load_matrix(path)


class _V:  # a cell's verdict as the rounds see it
    def __init__(self, name, baseline, status, unfinished=0):
        self.name, self.baseline, self.status = name, baseline, status
        self.runs = [RunVerdict("r", 0, "incomplete" if unfinished else "converged", "")]


def test_next_round_grows_undecided_cells_and_their_baseline_only():
    looks = [3, 6, 9]
    planned = {"b": 3, "x": 3, "y": 3, "z": 6}
    verdicts = [_V("b", "b", "Converges"), _V("x", "b", "Inconclusive"), _V("y", "b", "Converges"),
                _V("z", "b", "Inconclusive")]
    assert next_round(planned, verdicts, looks) == {"b": 9, "x": 6, "y": 3, "z": 9}
    full = {"b": 9, "x": 9}
    assert next_round(full, [_V("b", "b", "Converges"), _V("x", "b", "Inconclusive")], looks) == full, "max: stop"
    assert next_round({"b": 3, "x": 3}, [_V("b", "b", "Converges"), _V("x", "b", "Inconclusive", unfinished=1)],
                      looks) == {"b": 3, "x": 3}, "a seed not finished runs again before the cell grows"
    previous = {"cells": [{"name": "b", "runs": [0] * 9}, {"name": "x", "runs": [0] * 5}]}
    assert resumed(previous, ["b", "x", "new"], looks) == {"b": 9, "x": 6, "new": 3}


def _runs(scores, start=0.3, first_seed=0):
    return [RunVerdict(f"r{i}", first_seed + i, "converged", "", eval_start=start, eval_final=x, trained_to_end=True)
            for i, x in enumerate(scores)]


def test_a_verdict_reached_at_a_look_holds_when_the_baseline_runs_more_seeds():
    """The cell is compared with its baseline's first seeds, as many as its own: the baseline's later
    seeds, run for another cell, cannot move a decided verdict (here they would sink it)."""
    c = Criteria()
    cell = _runs([0.70, 0.72, 0.71])
    base3 = judge_cell("b", {}, None, _runs([0.71, 0.70, 0.72]), "b", None, c, True, Look(1, 3))
    base9 = judge_cell("b", {}, None, _runs([0.71, 0.70, 0.72] + [0.9] * 6), "b", None, c, True, Look(3, 3))
    at3 = judge_cell("x", {}, None, cell, "b", base3, c, True, Look(1, 3))
    later = judge_cell("x", {}, None, cell, "b", base9, c, True, Look(1, 3))
    assert at3.status == later.status == "Converges" and at3.delta_lower_bound == later.delta_lower_bound
    assert "96.7% bounds" in at3.reason and "(look 1 of 3, 90% over all looks)" in at3.reason


def test_decide_by_hand():
    d = lambda lo, hi: Difference((lo + hi) / 2, lo, hi, "", True, (0.1,))  # noqa: E731
    assert decide(d(-0.04, 0.02), 0.05) == "Converges"
    assert decide(d(-0.2, -0.06), 0.05) == "Convergence issue"
    assert decide(d(-0.06, 0.0), 0.05) == "Inconclusive"


def _readme_table() -> tuple[dict, list[tuple[float, str, Rates]]]:
    """The README's simulated table (between its adaptive-seeds markers) and the settings above it."""
    text = README.read_text()
    block = text[text.index("<!-- adaptive-seeds-table -->"):text.index("<!-- /adaptive-seeds-table -->")]
    head = re.search(r"looks at ([\d, ]+) seeds; sd ([\d.]+); tolerance ([\d.]+); confidence (\d+)% .*; (\d+) trials", block)
    settings = {"looks": [int(x) for x in head[1].split(",")], "sd": float(head[2]), "tolerance": float(head[3]),
                "confidence": int(head[4]) / 100, "trials": int(head[5])}
    rows = []
    for line in block.splitlines():
        m = re.match(r"\| ([+-][\d.]+) \| (per-look share|confidence each) \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+)% \| "
                     r"([\d.]+) \|", line)
        if m:
            rows.append((float(m[1]), m[2], Rates(float(m[1]), settings["trials"], float(m[3]) / 100, float(m[4]) / 100,
                                                  float(m[5]) / 100, float(m[6]))))
    return settings, rows


def test_the_error_rates_over_repeated_looks_match_the_readme():
    """A fresh simulation (another random seed) of the README's table agrees with it within simulation error,
    and the guarantee it states holds: at Δ = -tolerance a wrong verdict either way stays under 1 - confidence,
    where testing every look at `confidence` itself does not."""
    settings, rows = _readme_table()
    assert len(rows) >= 4, "the README's table lost its rows"
    c = Criteria(tolerance=settings["tolerance"], confidence=settings["confidence"])
    alpha, trials = 1 - settings["confidence"], 1500
    for delta, level, stated in rows:
        got = simulate(delta, settings["sd"], settings["looks"], c, trials, seed=12345, corrected=level == "per-look share")
        for field in ("converges", "issue", "inconclusive"):
            p, q = getattr(stated, field), getattr(got, field)
            tolerance = 4 * (got.se(p) + stated.se(p)) + 0.006  # + the README's rounding to 0.1%
            assert abs(p - q) <= tolerance, f"Δ {delta} ({level}) {field}: README {p:.3f}, simulated {q:.3f}"
        assert abs(got.mean_seeds - stated.mean_seeds) <= 0.3, f"Δ {delta}: mean seeds {got.mean_seeds} vs {stated.mean_seeds}"
        if delta == -settings["tolerance"]:
            if level == "per-look share":
                assert got.converges <= alpha + 3 * got.se(alpha) and got.issue <= alpha + 3 * got.se(alpha)
            else:
                assert got.converges > alpha + 3 * got.se(alpha), "uncorrected looks should show the inflation"
    planted = [r for d, lv, r in rows if d == -0.1 and lv == "per-look share"]
    assert planted and planted[0].issue >= 0.9, "a planted 0.1 degradation is found"


ADAPTIVE = """\
# adaptive seeds end to end: a baseline, an A/A copy on other seeds, zero lr and a collapsing lr
base:
  task: {name: arith, eval_size: 50}
  train: {steps: 3, prompts_per_step: 4, group_size: 4, eval_every: 3, checkpoint_every: 3, lr: 3.0e-4}
axes: {quant: [bf16]}
include:
  - {quant: bf16, label: A/A, seed_offset: 100}
  - {quant: bf16, train.lr: 0.0, label: zero-lr}
  - {quant: bf16, train.lr: 3.0e-3, label: lr too high}
seeds: {min: 2, max: 4, step: 1}
baseline: {quant: bf16}
criteria: {min_gain: 0.0, tolerance: 0.02}
"""


def _state(root: Path) -> dict:
    return {p.parent.name: p.stat().st_mtime_ns for p in root.glob("*/summary.json")}


def test_an_adaptive_sweep_grows_undecided_cells_and_resumes_after_a_kill(tmp_path, tiny_model):
    (tmp_path / "adaptive.yaml").write_text(ADAPTIVE)
    settings = harness.settings("sequential", device="cpu")
    whole = harness.sweep(tmp_path / "adaptive.yaml", results=tmp_path / "whole", reports=tmp_path / "reports",
                          executor=settings)
    by = {v.name: v for v in whole.verdicts}
    seeds = {n: len(v.runs) for n, v in by.items()}
    high = by["quant=bf16,train.lr=0.003 (lr too high)"]
    assert high.status == "Does not converge" and seeds[high.name] == 2, "decided at the first look: no more seeds"
    assert seeds["quant=bf16"] == max(seeds.values()), "the baseline runs every seed its cells run"
    grown = [n for n, k in seeds.items() if k > 2 and n != "quant=bf16"]
    assert grown, "some cell was undecided at 2 seeds (tolerance 0.02) and got more"
    for name in grown:
        assert by[name].look == seeds[name] - 1 and by[name].looks == 3

    # the same sweep, stopped (Ctrl-C) as the third round's first run starts, then run again
    def stop_in_round_3(event):
        if isinstance(event, Started) and event.job.cfg.seed % 100 == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harness.sweep(tmp_path / "adaptive.yaml", results=tmp_path / "killed", reports=tmp_path / "reports",
                      executor=settings, on_event=stop_in_round_3)
    root = tmp_path / "killed" / "adaptive"
    before = _state(root)
    assert len(before) == sum(min(k, 3) for k in seeds.values()), "rounds 1 and 2 finished before the stop"
    decided = {v.name: (v.status, len(v.runs)) for v in harness.judge(root)
               if v.status != "Inconclusive" and all(r.verdict != "incomplete" for r in v.runs)}
    assert decided[high.name] == ("Does not converge", 2)

    events = []
    again = harness.sweep(tmp_path / "adaptive.yaml", results=tmp_path / "killed", reports=tmp_path / "reports",
                          executor=settings, on_event=events.append)
    assert all(_state(root)[run] == t for run, t in before.items()), "no finished run ran again"
    assert sum(isinstance(e, Started) for e in events) == sum(seeds.values()) - len(before)
    after = {v.name: v for v in again.verdicts}
    for name, (status, n) in decided.items():
        if name != "quant=bf16":
            assert (after[name].status, len(after[name].runs)) == (status, n), f"{name} was decided before the stop"
    assert {n: (v.status, len(v.runs), v.reason) for n, v in after.items()} == \
        {n: (v.status, len(v.runs), v.reason) for n, v in by.items()}, "the resumed sweep ends where the whole one did"
    report = again.report.read_text()
    assert "Adaptive seeds: every cell ran 2 seeds first" in report and "(look 3/3)" in report


def test_resampling_real_runs_runs_the_same_procedure():
    """bench/calibration.py's resampling: a copy of the baseline (paired, same seeds) always converges; a cell
    whose runs do not learn is always flagged; an A/A cell on other seeds is compared unpaired."""
    from harness.results.simulate import resample

    c = Criteria()
    base = _runs([0.70, 0.72, 0.71, 0.69, 0.73, 0.70, 0.71, 0.72])
    same = _runs([0.70, 0.72, 0.71, 0.69, 0.73, 0.70, 0.71, 0.72])
    flat = [RunVerdict(f"f{i}", i, "no_learning", "", eval_start=0.3, eval_final=0.3, trained_to_end=True) for i in range(8)]
    other = _runs([0.71, 0.70, 0.72, 0.70, 0.69, 0.72, 0.71, 0.70], first_seed=100)
    assert resample(base, same, [4, 8], c, trials=50)["Converges"] == 1.0
    got = resample(base, flat, [4, 8], c, trials=50)
    assert got["Does not converge"] == 1.0 and got["mean_seeds"] == 4, "decided at the first look"
    assert resample(base, other, [4, 8], c, trials=50)["Converges"] == 1.0
    aa = judge_cell("aa", {}, None, other[:4], "b", judge_cell("b", {}, None, base, "b", None, c, True), c, True, Look(1, 2))
    assert aa.test == "Welch one-sided t bounds", "other seeds: compared unpaired"


def test_a_decided_cell_holds_when_a_later_baseline_seed_fails():
    """The baseline grows for another cell and its new seed OOMs: the cell decided on the baseline's
    first seeds keeps its verdict (only those seeds are compared)."""
    c = Criteria()
    cell = _runs([0.70, 0.72, 0.71, 0.70])
    first = _runs([0.71, 0.70, 0.72, 0.71])
    grown = first + _runs([0.7] * 3, first_seed=4) + [RunVerdict("r7", 7, "oom", "out of memory")]
    before = judge_cell("x", {}, None, cell, "b", judge_cell("b", {}, None, first, "b", None, c, True), c, True, Look(1, 2))
    base = judge_cell("b", {}, None, grown, "b", None, c, True, Look(2, 2))
    after = judge_cell("x", {}, None, cell, "b", base, c, True, Look(1, 2))
    assert base.status == "Error" and before.status == after.status == "Converges"
    broken = judge_cell("x", {}, None, cell, "b", judge_cell("b", {}, None, first[:3] + grown[-1:], "b", None, c, True), c,
                        True, Look(1, 2))
    assert broken.status == "Incomplete" and "baseline cell is Error" in broken.reason, "a failed seed among those compared"


def test_editing_the_seeds_never_loosens_the_level_of_each_look():
    from harness.results.looks import spread_over

    adaptive = {"looks": [3, 6, 9, 12], "looks_k": 4}
    assert spread_over(adaptive, [12]) == 4, "a plain list after 4 planned looks: still a quarter of the error each"
    assert spread_over(adaptive, [3, 6, 9, 12, 15, 18]) == 6
    assert spread_over(None, [3, 6]) == 2 and spread_over({"looks": [2]}, [2]) == 1
    assert look_at([12], 12, 4) == Look(1, 4) and Look(1, 4).confidence(0.9) == pytest.approx(0.975)


def test_resampling_a_pool_smaller_than_the_looks_keeps_each_looks_share():
    """A pool of 4 seeds reaches only the first of the matrix's looks, which is tested at its share of the
    error (95% for 2 looks), not at 90% as if it were the only one."""
    from harness.results.simulate import resample

    c = Criteria()
    base, cell = _runs([0.70] * 4), _runs([0.64, 0.68, 0.72, 0.68])  # Δ -0.02, paired sd 0.033: -0.047 at 90%, -0.059 at 95%
    assert resample(base, cell, [4], c, trials=20)["Converges"] == 1.0
    assert resample(base, cell, [4, 8], c, trials=20)["Inconclusive"] == 1.0


def test_harness_seeds_prints_the_simulated_table_and_names_a_bad_option():
    from typer.testing import CliRunner

    from harness.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["seeds", "--min", "3", "--max", "6", "--trials", "200", "--delta", "-0.1", "--uncorrected"])
    assert res.exit_code == 0, res.output
    assert "looks at 3, 6 seeds" in res.output and "(95.00% each)" in res.output
    rows = [line for line in res.output.splitlines() if line.startswith("| -0.10 |")]
    assert [r.split(" | ")[1] for r in rows] == ["per-look share", "confidence each"]
    res = runner.invoke(app, ["seeds", "--max", "2", "--min", "3"])
    assert res.exit_code != 0 and "--min/--max: max 2 is less than min 3" in res.output
