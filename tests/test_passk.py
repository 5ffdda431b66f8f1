"""pass@k and avg@k (eval.samples): the estimator by hand, a real tiny-model evaluation, the config checks, and
verdicts and reports that judge eval/avg@k when criteria.score says so."""

import math

import pytest
import torch

from harness.config.matrix import Criteria, MatrixError, load_matrix
from harness.config.run import RunConfig
from harness.evals.passk import CORRECT, eval_seed, pass_at_k, pass_ks, sample_metrics
from harness.results.verdict import judge, judge_run
from harness.tracking.files import JsonlTracker

from conftest import REPO, tiny_run_config
from synthetic import write_sweep


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2)) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 2) == 0.0  # nothing correct
    assert pass_at_k(5, 5, 2) == 1.0  # everything correct
    assert pass_at_k(5, 4, 2) == 1.0  # n - c < k: every pair holds a correct one
    assert pass_at_k(8, 3, 8) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the share correct
    for n, c, k in [(8, 1, 2), (8, 3, 4), (16, 5, 8), (200, 7, 100)]:  # the product form is C(n-c, k)/C(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


def test_pass_at_j_for_powers_of_two_below_k_then_k():
    assert pass_ks(1) == [1] and pass_ks(2) == [1, 2] and pass_ks(8) == [1, 2, 4, 8]
    assert pass_ks(6) == [1, 2, 4, 6] and pass_ks(16) == [1, 2, 4, 8, 16]


def test_sample_metrics_by_hand():
    m = sample_metrics([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert m["eval/avg@4"] == pytest.approx(6 / 12) == pytest.approx(m["eval/pass@1"])  # binary rewards: avg@k = pass@1
    assert m["eval/pass@2"] == pytest.approx((1 - math.comb(2, 2) / math.comb(4, 2) + 0 + 1) / 3)
    assert m["eval/pass@4"] == pytest.approx(2 / 3) and m["eval/samples"] == 4
    assert set(m) == {"eval/avg@4", "eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/samples"}
    partial = sample_metrics([[0.5, 1.0]])  # partial credit: averaged into avg@k, not correct for pass@k
    assert CORRECT == 1.0 and partial["eval/avg@2"] == 0.75 and partial["eval/pass@1"] == 0.5
    with pytest.raises(ValueError, match="same number"):
        sample_metrics([[1, 0], [1]])


def test_eval_seed_is_the_runs_and_the_steps():
    assert eval_seed(0, 25) == eval_seed(0, 25) != eval_seed(0, 50) != eval_seed(1, 50)
    assert 0 <= eval_seed(3, 200) < 2**32


def _engine(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.rollout.hf import HFEngine
    from harness.tasks import load_task

    cfg = tiny_run_config()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return HFEngine(model, AutoTokenizer.from_pretrained(model_dir), cfg), load_task(cfg.task)


def test_sampled_eval_on_the_tiny_model_is_seeded_and_leaves_the_global_stream(tiny_model):
    from harness.rollout.hf import held_out_metrics

    engine, task = _engine(tiny_model)
    problems = task.eval[:40]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    greedy = held_out_metrics(engine, task, problems)
    m = held_out_metrics(engine, task, problems, samples=8, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), state), "sampling the eval drew from the rollouts' stream"
    assert m["eval/reward"] == greedy["eval/reward"] and m["eval/n"] == greedy["eval/n"] == 40
    assert set(m) - set(greedy) == {"eval/avg@8", "eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/pass@8", "eval/samples"}
    assert 0 < m["eval/avg@8"] < 1 and m["eval/pass@1"] == pytest.approx(m["eval/avg@8"])  # arith's reward is 0 or 1
    assert m["eval/pass@1"] <= m["eval/pass@2"] <= m["eval/pass@4"] <= m["eval/pass@8"]
    assert held_out_metrics(engine, task, problems, samples=8, seed=7) == m  # the seed decides the samples
    assert held_out_metrics(engine, task, problems, samples=8, seed=8) != m
    rollout = engine.generate([problems[0].prompt] * 16, temperature=1.0, seed=1)
    assert rollout.sampler_logprobs is None and len(set(rollout.texts)) > 1  # the copies of a prompt differ


def test_samples_change_neither_greedy_eval_nor_training(tmp_path, tiny_model):
    """The same run with eval.samples 4 and 0: every training metric and the greedy eval/reward agree exactly."""
    from harness.execution.lifecycle import run_one
    from harness.results.layout import read_metrics

    rows = {}
    for k in (0, 4):
        cfg = tiny_run_config(steps=4, eval_every=2)
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_validate({"samples": k, "temperature": 0.7})})
        summary = run_one(cfg, tmp_path / cfg.run_id, torch.device("cpu"))
        assert summary["status"] == "ok", summary.get("traceback")
        rows[k] = read_metrics(tmp_path / cfg.run_id)
    timed = ("time/", "throughput/", "memory/")
    for plain, sampled in zip(rows[0], rows[4], strict=True):
        assert {k: v for k, v in sampled.items() if k in plain and not k.startswith(timed)} == \
               {k: v for k, v in plain.items() if not k.startswith(timed)}
    evals = [r for r in rows[4] if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all({"eval/avg@4", "eval/pass@4", "eval/samples"} <= set(r) for r in evals)
    assert not any(k.startswith("eval/avg@") for r in rows[0] for k in r)


def test_run_ids_stay_put_while_samples_are_off():
    smoke = load_matrix(REPO / "matrices" / "smoke.yaml")
    assert smoke.cells[0].runs[0].run_id == "2f53d996f55a"  # quant=bf16, seed 0: the committed reference's folder
    cfg = smoke.cells[0].runs[0]
    assert '"eval"' not in cfg.canonical_json()
    on = cfg.model_copy(update={"eval": cfg.eval.model_validate({"samples": 8})})
    assert on.run_id != cfg.run_id and '"samples":8' in on.canonical_json()
    assert RunConfig.model_validate({"eval": {"samples": 0, "temperature": 1.0}}).run_id == RunConfig().run_id


def test_score_avg_needs_samples_in_every_cell(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("axes: {quant: [bf16, nf4]}\ninclude: [{quant: bf16, eval.samples: 4, label: sampled}]\n"
                    "criteria: {score: avg}\n")
    with pytest.raises(MatrixError) as e:
        load_matrix(path)
    msg = str(e.value)
    assert "cell quant=bf16: criteria.score: avg" in msg and "cell quant=nf4: criteria.score: avg" in msg
    assert "sampled" not in msg and "eval.samples" in msg
    path.write_text("base: {eval: {samples: 4}}\naxes: {quant: [bf16, nf4]}\ncriteria: {score: avg}\n")
    assert all(c.runs[0].eval.samples == 4 for c in load_matrix(path).cells)
    path.write_text("criteria: {score: best}\n")
    with pytest.raises(MatrixError, match="criteria.score"):
        load_matrix(path)


def sampled_run(run_dir, greedy: dict[int, float], avg: dict[int, float], k: int = 8, n: int = 100):
    """A finished run that logged both evals: eval/reward (greedy) and eval/avg@k at the same steps."""
    t = JsonlTracker(run_dir)
    t.log({"eval/reward": greedy[0], "eval/n": n, f"eval/avg@{k}": avg[0], "eval/samples": k}, 0)
    for step in range(1, 21):
        row = {"kl": 0.1, "entropy": 0.5, "reward/mean": 0.5, "loss": 0.1}
        if step in greedy:
            row |= {"eval/reward": greedy[step], "eval/n": n, f"eval/avg@{k}": avg[step], "eval/samples": k}
        t.log(row, step)
    t.finish({"status": "ok", "error": None, "peak_memory_gib": 0.5, "median_step_s": 0.1})


def test_verdict_judges_avg_at_k_when_told(tmp_path):
    sampled_run(tmp_path / "r", {0: 0.40, 10: 0.50, 15: 0.52, 20: 0.54}, {0: 0.30, 10: 0.36, 15: 0.40, 20: 0.41})
    greedy = judge_run(tmp_path / "r", 0, Criteria())
    assert greedy.score == "eval/reward" and greedy.eval_final == pytest.approx(0.53) and greedy.eval_start == 0.40
    assert greedy.eval_se == pytest.approx(math.sqrt(0.53 * 0.47 / 100)) and greedy.reason.startswith("eval/reward 0.400")
    avg = judge_run(tmp_path / "r", 0, Criteria(score="avg"))
    assert avg.score == "eval/avg@8" and avg.eval_start == 0.30 and avg.eval_final == pytest.approx(0.405)
    assert avg.eval_best == 0.41 and avg.final_steps == [15, 20]
    assert avg.eval_se == pytest.approx(math.sqrt(0.405 * 0.595 / 800))  # n: 100 prompts x 8 samples
    assert avg.verdict == "converged" and avg.reason.startswith("eval/avg@8 0.300 → 0.405")
    flat = judge_run(tmp_path / "r", 0, Criteria(score="avg", min_gain=0.2))
    assert flat.verdict == "no_learning" and "eval/avg@8" in flat.reason


def test_a_run_without_avg_at_k_is_not_judged_on_greedy_instead(tmp_path):
    from synthetic import curve_run

    curve_run(tmp_path / "r", [(0, 0.4), (10, 0.6)], [0.1] * 10)
    v = judge_run(tmp_path / "r", 0, Criteria(score="avg"))
    assert v.eval_final is None and v.verdict == "no_learning" and "eval/avg@k" in v.reason


def test_sweep_verdicts_and_report_name_the_score(tmp_path):
    from harness.reports import write_report

    root, runs = write_sweep(tmp_path, "base: {eval: {samples: 8}}\naxes: {quant: [bf16, nf4]}\nseeds: [0, 1]\n"
                                       "baseline: {quant: bf16}\ncriteria: {score: avg}\n")
    for cell, finals in (("quant=bf16", (0.60, 0.61)), ("quant=nf4", (0.40, 0.42))):
        for d, x in zip(runs[cell], finals):
            sampled_run(d, {0: 0.4, 10: 0.6, 15: 0.6, 20: 0.6}, {0: 0.3, 10: x, 15: x, 20: x})
    cells = {v.name: v for v in judge(root)}
    assert cells["quant=bf16"].eval_final_mean == pytest.approx(0.605)
    assert cells["quant=nf4"].delta_vs_baseline == pytest.approx(-0.195)  # greedy says 0: only avg@8 tells them apart
    assert cells["quant=nf4"].status == "Convergence issue"
    report = write_report(root, tmp_path / "report").read_text()
    assert "final eval/avg@8 [CI]" in report and "The verdicts judge eval/avg@8 (criteria.score: avg)" in report
    assert "n = held-out prompts × k" in report
    html = (tmp_path / "report" / "report.html").read_text()
    assert "final eval/avg@8 [CI]" in html and "held-out eval/avg@8 (sampled)" in html
