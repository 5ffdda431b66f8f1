"""Damaged results are caught and explained: a torn summary.json or metrics.jsonl is named, the run is
judged as unfinished and the next sweep resumes it; a killed run is retried; a sweep with nothing trained fails."""

import json
import os

import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.execution.jobs import Job, Retry, pending, reopen_all
from harness.execution.lifecycle import record_lost, run_one
from harness.results.layout import damage, read_json, read_metrics
from harness.results.verdict import judge

from conftest import tiny_run_config
from synthetic import curve_run, write_sweep

TWO_SEEDS = """\
base: {task: {name: arith, eval_size: 50}}
axes: {quant: [bf16]}
seeds: [0, 1]
"""
CURVE = ([(0, 0.4), (4, 0.6), (8, 0.75)], [0.1] * 8)


def sweep_of_two(tmp_path):
    root, cells = write_sweep(tmp_path, TWO_SEEDS)
    runs = cells["quant=bf16"]
    for d in runs:
        curve_run(d, *CURVE)
        summary = read_json(d / "summary.json") | {"steps_completed": 8}
        (d / "summary.json").write_text(json.dumps(summary))
    return root, runs


def cut(path, keep: float):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_whole_run_is_trusted(tmp_path):
    root, runs = sweep_of_two(tmp_path)
    assert [damage(d) for d in runs] == [None, None]
    assert [r.verdict for r in judge(root)[0].runs] == ["converged", "converged"]


def test_a_torn_summary_is_named_and_the_run_judged_unfinished(tmp_path):
    root, runs = sweep_of_two(tmp_path)
    cut(runs[0] / "summary.json", 0.5)
    problem = damage(runs[0])
    assert str(runs[0] / "summary.json") in problem and "not valid JSON" in problem
    v = judge(root)[0]
    assert v.runs[0].verdict == "incomplete" and v.runs[0].damage == problem and "resumes" in v.runs[0].reason
    assert v.status == "Smoke tested", "one trusted seed of two: not enough for a verdict"

    out = CliRunner().invoke(app, ["report", "v", "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "reports")])
    assert out.exit_code == 0, out.output
    assert "could not trust 1 run" in out.output and "summary.json" in out.output
    assert "not valid JSON" in (tmp_path / "reports" / "v" / "report.md").read_text()


def test_metrics_cut_mid_line_in_a_finished_run_are_not_read_as_its_end(tmp_path):
    """The issue's case: the final score silently became an early eval although summary.json said every step ran."""
    root, runs = sweep_of_two(tmp_path)
    metrics = runs[1] / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:5]) + lines[5][:7])  # rows of steps 0-4, then half a row
    assert read_metrics(runs[1])[-1]["step"] == 4
    problem = damage(runs[1])
    assert str(metrics) in problem and "line 6 of 6" in problem
    assert judge(root)[0].runs[1].verdict == "incomplete"

    metrics.write_text("".join(lines[:5]))  # cut at a row boundary: every line parses, but rows are missing
    assert "ends at step 4, but" in damage(runs[1]) and "8 steps were completed" in damage(runs[1])


def test_a_damaged_line_in_the_middle_is_caught(tmp_path):
    _, runs = sweep_of_two(tmp_path)
    metrics = runs[0] / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    lines[3] = "\x00" * 20 + "\n"  # a host crash can leave zeros where a write did not reach the disk
    metrics.write_text("".join(lines))
    assert "line 4 of 9 is not a metrics row" in damage(runs[0])


def test_a_torn_config_json_does_not_stop_the_judging(tmp_path):
    """A run logged without eval/n has its eval size read from config.json; torn, it is unknown, not a crash."""
    root, cells = write_sweep(tmp_path, TWO_SEEDS)
    for d in cells["quant=bf16"]:
        curve_run(d, *CURVE, eval_n=None)
        (d / "config.json").write_text('{"task": {"eval_size": 5')
    v = judge(root)[0]
    assert [r.verdict for r in v.runs] == ["converged", "converged"]


def test_a_torn_matrix_json_is_named(tmp_path):
    root, _ = sweep_of_two(tmp_path)
    cut(root / "matrix.json", 0.5)
    out = CliRunner().invoke(app, ["report", "v", "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "reports")])
    assert out.exit_code == 2 and str(root / "matrix.json") in out.output and "Traceback" not in out.output, out.output


def interrupted_at(step: int):
    def progress(**kw):
        if kw.get("step", 0) >= step:
            raise KeyboardInterrupt  # what a stop does to a run: no summary.json

    return progress


def test_a_damaged_finished_run_is_resumed_and_ends_as_an_uninterrupted_one(tmp_path, tiny_model):
    cfg = tiny_run_config(steps=4, eval_every=2, checkpoint_every=2)
    damaged = tmp_path / "damaged"
    run_one(cfg, damaged, pick_cpu())
    whole = read_metrics(damaged)
    cut(damaged / "metrics.jsonl", 0.5)
    [p] = pending([Job(cfg, damaged)])
    assert p.why.startswith("damaged results, resumed") and "metrics.jsonl" in p.why
    reopen_all([p])
    assert not (damaged / "summary.json").exists() and read_json(damaged / "attempts" / "1.json")["status"] == "damaged"
    summary = run_one(cfg, damaged, pick_cpu())  # rows before the final checkpoint were lost: trained again from step 0
    assert summary["status"] == "ok" and damage(damaged) is None
    assert timeless(read_metrics(damaged)) == timeless(whole)


def timeless(rows: list[dict]) -> list[dict]:
    """Metric rows without the measurements of time and memory, which differ between identical runs."""
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/", "memory/"))} for r in rows]


def pick_cpu():
    import torch

    return torch.device("cpu")


def test_killed_runs_are_retried_up_to_max_retries_then_kept_until_asked(tmp_path, tiny_model):
    cfg = tiny_run_config(steps=4, eval_every=2, checkpoint_every=2)
    job = Job(cfg, tmp_path / cfg.run_id)
    with pytest.raises(KeyboardInterrupt):
        run_one(cfg, job.run_dir, pick_cpu(), interrupted_at(3))
    with open(job.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward/me')  # the row it was writing when it died
    record_lost(job, "killed", "the run's process was killed by SIGKILL")  # what the local executor writes for it
    assert damage(job.run_dir) is None, "a killed run's torn last row is what killing it did, not damage"
    [p] = pending([job], Retry(max_retries=1))
    assert "1 of --max-retries 1" in p.why
    assert pending([job], Retry(max_retries=0)) == []
    reopen_all([p])
    assert run_one(cfg, job.run_dir, pick_cpu())["status"] == "ok"
    assert [r["step"] for r in read_metrics(job.run_dir)] == [0, 1, 2, 3, 4], "resumed from the step-2 checkpoint, no duplicates"
    assert len(read_json(job.run_dir / "env.json")["resumed_at"]) == 1

    os.remove(job.run_dir / "summary.json")
    record_lost(job, "killed", "killed again")
    assert pending([job], Retry(max_retries=1)) == [], "retried once already"
    assert pending([job], Retry(max_retries=2))
    [p] = pending([job], Retry(frozenset({"killed"}), max_retries=1))
    assert "--retry killed" in p.why


def test_retry_names_the_valid_statuses(tmp_path):
    out = CliRunner().invoke(app, ["sweep", "smoke", "--dry-run", "--retry", "killed,ok"])
    assert out.exit_code == 2 and "ok is not a status to retry; valid: failed, killed, oom" in out.output, out.output
