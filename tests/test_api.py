"""The Python API in-process: a sweep planned, executed, judged, reported and loaded as DataFrames,
with the events a caller sees; and the typed errors it raises instead of exiting."""

import json

import pytest

import harness
from harness.errors import HarnessError, SweepNotFound, UsageError
from harness.execution.events import Ended, Planned, Started, Stepped

MATRIX = """\
# two tiny runs, in-process: the API's whole path in a few seconds
base:
  task: {name: arith, eval_size: 20}
  train: {steps: 2, prompts_per_step: 2, group_size: 2, eval_every: 1, checkpoint_every: 2}
axes: {quant: [bf16]}
seeds: [0, 1]
"""


def test_a_sweep_from_python_runs_judges_reports_and_loads_as_dataframes(tmp_path, tiny_model):
    (tmp_path / "api.yaml").write_text(MATRIX)
    events = []
    result = harness.sweep(tmp_path / "api.yaml", results=tmp_path / "results", reports=tmp_path / "reports",
                           executor=harness.settings("sequential", device="cpu"), on_event=events.append)
    kinds = [type(e) for e in events]
    assert kinds[0] is Planned and events[0].total == 2 and events[0].todo == 2
    assert kinds.count(Started) == 2 and kinds.count(Ended) == 2 and Stepped in kinds
    assert all(e.ok for e in events if isinstance(e, Ended)), [str(e) for e in events]
    assert str(events[0]) == "api: 1 cells: 2 runs, 0 already finished, 2 to run"
    assert result.report == tmp_path / "reports" / "api" / "report.md" and result.report.exists()
    assert result.statuses == {"ok": 2} and not result.nothing_trained
    from harness.models.tiny_arith import SHIPPED, checksum

    env = json.loads((result.plan.jobs[0].run_dir / "env.json").read_text())
    assert env["model"] == {"name": "builtin:tiny-arith", "sha256": checksum(SHIPPED), "shipped": "tiny-arith-v1"}
    assert env["compute_dtype"].split(":")[0] in ("bfloat16", "float32") and "auto" in env["compute_dtype"]
    report = result.report.read_text()
    assert f"- model: builtin:tiny-arith, sha256 `{checksum(SHIPPED)}` (shipped tiny-arith-v1)" in report
    assert "- compute dtype: " in report

    steps = harness.steps(result.plan)
    assert len(steps) == 2 * 3, "steps 0 (the start's eval), 1 and 2 of each run"
    assert list(steps.columns[:5]) == ["quant", "cell", "seed", "run_id", "step"], "the axes first, then who and when"
    assert set(steps["seed"]) == {0, 1} and set(steps["quant"]) == {"bf16"}
    assert steps["eval/reward"].notna().all(), "every step was evaluated (eval_every: 1)"
    cells = harness.cells("api", results=tmp_path / "results")
    assert list(cells["status"]) == [v.status for v in result.verdicts]

    again = []
    assert harness.execute(harness.plan(tmp_path / "api.yaml", tmp_path / "results"), harness.settings("sequential"),
                           on_event=again.append) == []
    assert [type(e) for e in again] == [Planned] and again[0].todo == 0, "finished runs are not run again"


def test_the_api_raises_typed_errors_a_caller_can_catch(tmp_path):
    with pytest.raises(UsageError, match="unknown executor 'lokal'.*did you mean 'local'"):
        harness.settings("lokal")
    with pytest.raises(UsageError, match="ok is not a status to retry; valid: failed, killed, oom"):
        harness.retry("failed,ok")
    with pytest.raises(UsageError, match="no matrix 'smok'.*Did you mean 'smoke'"):
        harness.load("smok")
    with pytest.raises(UsageError, match="matches no cell of smoke"):
        harness.plan("smoke", tmp_path, cells="quant=fp4")
    with pytest.raises(SweepNotFound, match="no sweep at .*run `harness sweep nothing` first"):
        harness.judge("nothing", results=tmp_path)
    assert issubclass(UsageError, HarnessError) and issubclass(SweepNotFound, HarnessError)


def test_the_api_functions_are_not_shadowed_by_subpackages(tmp_path):
    """`import harness.reports.html` sets an attribute on `harness`: a subpackage named like an API
    function (harness/report/, harness/tune/ once) would replace the function after first use."""
    import importlib
    import pkgutil

    import harness.api

    for info in pkgutil.walk_packages(harness.__path__, "harness."):
        if not info.name.startswith("harness.cli"):
            importlib.import_module(info.name)
    for name in harness.__all__:
        assert getattr(harness, name) is getattr(harness.api, name, None) or name == "HarnessError", name


def test_one_config_runs_from_python_and_resumes_as_finished(tmp_path, tiny_model):
    from harness.config.run import RunConfig

    cfg = RunConfig(task={"name": "arith", "eval_size": 20},
                    train={"steps": 2, "prompts_per_step": 2, "group_size": 2, "eval_every": 2, "checkpoint_every": 2})
    events = []
    job = harness.run(cfg, results=tmp_path, name="one", executor=harness.settings("sequential"), on_event=events.append)
    assert job.run_dir == tmp_path / "one" / cfg.run_id
    assert [type(e) for e in events if not isinstance(e, Stepped)] == [Planned, Started, Ended] and events[-1].ok
    again = []
    harness.run(cfg, results=tmp_path, name="one", executor=harness.settings("sequential"), on_event=again.append)
    assert [(type(e), e.todo) for e in again] == [(Planned, 0)]


def test_git_commit_says_when_the_code_is_not_that_commit(tmp_path):
    """env.json's git_commit: the commit, "+dirty" when a tracked file differs from it (a working tree copied onto
    another machine beside an older .git), untracked files (results/) not counted."""
    import subprocess

    from harness.common.system import git_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("a = 1\n")
    git("add", "code.py")
    git("commit", "-qm", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "results.json").write_text("{}")
    assert git_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("a = 2\n")
    assert git_commit(tmp_path) == head + "+dirty"
    assert git_commit(tmp_path / "nowhere") is None  # no such folder: no commit to name
