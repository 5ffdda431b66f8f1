"""Each verdict rule on real writers and planted curves, the curves taken from real runs where they exist.

`fixtures/smoke_seed_study_h200.json` holds the smoke configuration run with 24 seeds each in bf16
and nf4 on an H200 (eval/reward every 25 steps, kl every step): every seed learns (0.51 -> ~0.72),
9 of 24 per arm have a single-step k3 spike above 1.0, and no 10-step rolling median exceeds 0.30.
"""

import json
import math
import statistics

import pytest

from harness.config.matrix import Criteria
from harness.results.verdict import Difference, final_window, judge, judge_cell, judge_run, rolling_median, seeds_to_decide

from conftest import FIXTURES
from synthetic import curve_run, write_sweep

STUDY = json.loads((FIXTURES / "smoke_seed_study_h200.json").read_text())["runs"]
C = Criteria()  # the defaults the matrices use: kl_max 1.0 over a 10-step median, drop_max 0.15, last 25% of training


def study_run(quant: str, seed: int) -> dict:
    return next(r for r in STUDY if r["quant"] == quant and r["seed"] == seed)


def write_study_run(run_dir, quant, seed):
    r = study_run(quant, seed)
    curve_run(run_dir, [tuple(x) for x in r["evals"]], r["kl"])
    return run_dir


def test_rolling_median_and_final_window_by_hand():
    assert rolling_median([1, 5, 2, 8, 3], 3) == [2, 5, 3]
    assert rolling_median([4, 1], 10) == [2.5]  # shorter than the window: the median of what there is
    evals = [(s, s / 1000) for s in range(0, 201, 25)]
    assert [s for s, _ in final_window(evals, 0.25)] == [150, 175, 200]
    assert [s for s, _ in final_window(evals, 0.01)] == [200]  # at least the last eval
    assert [s for s, _ in final_window([(0, 0.4), (50, 0.5)], 1.0)] == [50]  # never step 0
    assert final_window([(s, 0.5) for s in range(0, 201, 10)], 0.45)[0][0] == 110  # 200 x 0.55 in floats is 110.00000000000001


def test_final_score_is_the_window_mean_with_one_evals_binomial_error(tmp_path):
    r = study_run("bf16", 22)  # its last eval, 0.810, is its best by 0.06: one lucky evaluation
    v = judge_run(write_study_run(tmp_path / "run", "bf16", 22), 22, C)
    assert v.eval_end == 0.810 and v.final_steps == [150, 175, 200]
    assert v.eval_final == pytest.approx(statistics.fmean(x for s, x in r["evals"] if s >= 150)) == pytest.approx(0.742, abs=1e-4)
    assert v.gain == pytest.approx(v.eval_final - 0.506)
    assert v.eval_se == pytest.approx(math.sqrt(0.742 * 0.258 / 500), abs=1e-5)  # 0.0196


@pytest.mark.parametrize("quant,seed,largest", [("bf16", 8, 3.91), ("nf4", 8, 6.37), ("nf4", 10, 2.81)])
def test_a_single_step_kl_spike_is_counted_not_judged(tmp_path, quant, seed, largest):
    v = judge_run(write_study_run(tmp_path / "run", quant, seed), seed, C)
    assert v.verdict == "converged"
    assert v.max_kl == pytest.approx(largest, abs=0.01) and v.kl_spikes >= 1 and v.kl_median_max < 0.3
    assert "single-step kl spike" in v.reason and "not judged" in v.reason


def test_a_sustained_kl_rise_is_diverged(tmp_path):
    """The same run with kl climbing from step 120 on, as a policy running away from its reference does:
    the 10-step median crosses 1.0 a few steps after the kl itself does."""
    r = study_run("bf16", 0)
    kls = r["kl"][:120] + [0.3 * 1.05 ** i for i in range(80)]  # 0.3 at step 121, 1.0 at step 146, 14 by step 200
    curve_run(tmp_path / "run", [tuple(x) for x in r["evals"]], kls)
    v = judge_run(tmp_path / "run", 0, C)
    assert v.verdict == "diverged" and "a sustained rise" in v.reason
    first_over = next(i for i, k in enumerate(kls, start=1) if k > 1.0)
    step = int(v.reason.split("from step ")[1].split(" ")[0])
    assert first_over < step <= first_over + C.kl_window  # the median needs half its window above kl_max


def test_kl_growth_in_a_recipe_without_kl_in_its_loss_is_information(tmp_path):
    """SFT moves the policy away from the base on purpose and has no KL term to hold it: its kl is shown,
    not judged. The same curves under grpo are a sustained rise."""
    root, runs = write_sweep(tmp_path, "axes: {algorithm: [sft, grpo]}\nseeds: [0, 1]\n")
    growing = [0.05 * i for i in range(1, 101)]  # 0.05 -> 5.0, steadily
    for cell in runs.values():
        for d in cell:
            curve_run(d, [(0, 0.40), (50, 0.60), (75, 0.70), (100, 0.71)], growing)
    cells = {c.name: c for c in judge(root)}
    sft, grpo = cells["algorithm=sft"], cells["algorithm=grpo"]
    assert [r.verdict for r in sft.runs] == ["converged"] * 2 and sft.status == "Converges"
    assert all(not r.kl_judged and "kl not judged" in r.reason for r in sft.runs)
    assert [r.verdict for r in grpo.runs] == ["diverged"] * 2
    assert grpo.status == "Convergence issue" and "2/2 seeds diverged although 2 gain" in grpo.reason  # learns, unstably


def test_beta_zero_grpo_has_no_kl_term_to_judge(tmp_path):
    root, _ = write_sweep(tmp_path, "base: {train: {beta: 0.0}}\naxes: {quant: [bf16]}\nseeds: [0, 1]\n")
    assert json.loads((root / "matrix.json").read_text())["cells"][0]["runs"][0]["kl_in_loss"] is False


def test_eval_collapse_after_learning_is_diverged_and_a_recovery_is_not(tmp_path):
    kls = [0.2] * 200
    learn = [(0, 0.40), (25, 0.60), (50, 0.80), (75, 0.85), (100, 0.84)]
    curve_run(tmp_path / "collapsed", learn + [(125, 0.70), (150, 0.55), (175, 0.50), (200, 0.52)], kls)
    curve_run(tmp_path / "recovered", learn + [(125, 0.55), (150, 0.80), (175, 0.83), (200, 0.84)], kls)
    collapsed = judge_run(tmp_path / "collapsed", 0, C)
    assert collapsed.verdict == "diverged" and collapsed.gain > 0.05, "it still gains: only the collapse rule catches it"
    assert "collapsed: best 0.850 at step 75, final 0.523" in collapsed.reason
    assert judge_run(tmp_path / "recovered", 0, C).verdict == "converged"


def test_a_run_still_climbing_is_not_a_collapse(tmp_path):
    """Its best eval is its last one and the window mean lags it by more than drop_max: still learning."""
    curve_run(tmp_path / "rising", [(0, 0.40), (50, 0.45), (100, 0.50), (150, 0.55), (175, 0.60), (200, 0.90)], [0.2] * 200)
    v = judge_run(tmp_path / "rising", 0, C)
    assert v.eval_best - v.eval_final > C.drop_max and v.verdict == "converged"


@pytest.fixture(scope="module")
def study_verdicts(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    return {(r["quant"], r["seed"]): judge_run(write_study_run(root / f"{r['quant']}{r['seed']}", r["quant"], r["seed"]),
                                               r["seed"], C)
            for r in STUDY}


def test_no_h200_study_run_is_flagged(study_verdicts):
    """48 real runs that all learned: none diverged, none collapsed, whatever their spikes."""
    assert [v.verdict for v in study_verdicts.values()] == ["converged"] * 48
    assert sum(v.kl_spikes > 0 for v in study_verdicts.values()) == 18  # 9 of 24 per arm, as the study says


@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_a_over_a_is_never_a_convergence_issue(study_verdicts, n):
    """Identical configurations, disjoint seeds, relabelled 0..n-1 as a sweep pairs them: every split of
    each arm's 24 seeds into consecutive groups reads Converges or Inconclusive, and with 3 seeds most
    read Converges (the study: 88% with the 3-eval final score)."""
    statuses = []
    for quant in ("bf16", "nf4"):
        for start in range(0, 24 - 2 * n + 1, n):
            base = [_relabel(study_verdicts[quant, start + i], i) for i in range(n)]
            other = [_relabel(study_verdicts[quant, start + n + i], i) for i in range(n)]
            b = judge_cell("base", {}, None, base, "base", None, C, True)
            cell = judge_cell("other", {}, None, other, "base", b, C, True)
            assert b.status == "Converges"
            statuses.append(cell.status)
            if cell.status == "Inconclusive":  # the bound straddles at n seeds, so deciding it takes more
                assert cell.seeds_to_decide is None or cell.seeds_to_decide > n
    assert set(statuses) <= {"Converges", "Inconclusive"}
    if n >= 3:
        assert statuses.count("Converges") > len(statuses) / 2


def _relabel(v, seed):
    from dataclasses import replace

    return replace(v, seed=seed)


def test_a_cell_shown_worse_is_a_convergence_issue(study_verdicts):
    """bf16 seeds as the baseline, and the same curves 0.1 lower as the other cell: learns, stable, worse."""
    from dataclasses import replace

    base = [_relabel(study_verdicts["bf16", s], s) for s in range(4)]
    worse = [replace(study_verdicts["nf4", s], eval_final=study_verdicts["nf4", s].eval_final - 0.1) for s in range(4)]
    b = judge_cell("base", {}, None, base, "base", None, C, True)
    cell = judge_cell("worse", {}, None, worse, "base", b, C, True)
    assert cell.status == "Convergence issue" and "shown worse" in cell.reason and cell.delta_upper_bound < -C.tolerance


def test_seeds_to_decide_by_hand():
    """Paired sd 0.03 at Δ 0: (t_.9 + t_.8) x 0.03 / sqrt(n) is (1.886 + 1.061) x 0.03 / sqrt(3) = 0.0510 > 0.05
    at n = 3 and (1.638 + 0.978) x 0.03 / 2 = 0.0392 at n = 4."""
    d = Difference(0.0, -0.1, 0.1, "paired", True, (0.03,))
    assert seeds_to_decide(d, 0.05, 0.9, 0.8) == 4
    assert seeds_to_decide(Difference(-0.05, -0.1, 0.0, "paired", True, (0.03,)), 0.05, 0.9, 0.8) is None  # Δ on the tolerance
    # Welch, both arms sd 0.03: se = 0.03 x sqrt(2/n), df = 2n - 2: (1.533 + 0.941) x 0.0245 = 0.0606 at n = 3,
    # (1.440 + 0.906) x 0.0212 = 0.0498 at n = 4
    assert seeds_to_decide(Difference(0.0, -0.1, 0.1, "Welch", False, (0.03, 0.03)), 0.05, 0.9, 0.8) == 4


def test_a_sweep_saved_before_kl_in_loss_reads_it_from_each_runs_config(tmp_path):
    """matrix.json of an older sweep has no kl_in_loss: the run's config.json decides, and without one KL is judged."""
    from harness.common.files import write_json_atomic
    from harness.config.run import RunConfig
    from harness.results.verdict import _kl_in_loss

    write_json_atomic(tmp_path / "sft" / "config.json", RunConfig(algorithm="sft").model_dump(mode="json"))
    write_json_atomic(tmp_path / "grpo" / "config.json", RunConfig().model_dump(mode="json"))
    assert [_kl_in_loss(tmp_path / d, {"seed": 0}) for d in ("sft", "grpo", "missing")] == [False, True, True]
