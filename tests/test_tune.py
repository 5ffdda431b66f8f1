"""`harness tune`: real Optuna studies (sqlite storage) whose trials train the tiny model."""

import os
import signal
import subprocess
import sys

import pytest
import yaml
from optuna.trial import TrialState

from harness.config.matrix import MatrixError, load_matrix
from harness.config.tune_space import TuneSpec, check_space, defaults, trial_config
from harness.models import checkpoint
from harness.results.layout import read_json, read_metrics

from conftest import REPO
from processes import freeze, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

TRAIN = {"steps": 12, "prompts_per_step": 8, "group_size": 4, "eval_every": 4, "checkpoint_every": 4}


def write_matrix(path, tune: dict, train: dict | None = None) -> None:
    path.write_text("# harness tune " + path.stem + " --cell quant=bf16\n" + yaml.safe_dump({
        "base": {"task": {"name": "arith", "eval_size": 64}, "train": TRAIN | (train or {})},
        "axes": {"quant": ["bf16"]},
        "tune": tune,
    }))


def make_study(tmp_path, tune: dict, name="s", trials=3, train=None):
    from harness.tuning import study as t
    path = tmp_path / "m.yaml"
    write_matrix(path, tune, train)
    m = load_matrix(path)
    cell = m.cells[0]
    return t.Study(name=name, storage=t.default_storage(tmp_path / "results", m.name), matrix=m.name, cell=cell.name,
                   cell_cfg=cell.runs[0], spec=m.spec.tune, trials=trials, root=tmp_path / "results" / m.name / "tune" / name)


# --- the space, checked before any trial trains


def test_tune_section_errors_name_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    write_matrix(path, {"params": {"lora.rank": {"choices": [4, 8]}}})
    with pytest.raises(MatrixError, match=r"tune.*params.lora.rank: not a RunConfig field"):
        load_matrix(path)
    write_matrix(path, {"objectives": ["eval_reward", "peak_memory"]})  # the default median pruner can't prune two objectives
    with pytest.raises(MatrixError, match="pruner: {name: none}"):
        load_matrix(path)
    write_matrix(path, {"objectives": ["peak_memory"], "pruner": {"name": "none"}})
    with pytest.raises(MatrixError, match=r"objectives: \[eval_reward\] or"):
        load_matrix(path)
    write_matrix(path, {"params": {"lora.target_modules": {"choices": [["q_proj"], ["v_proj"]]}}})
    with pytest.raises(MatrixError, match="choices must be numbers, strings"):
        load_matrix(path)
    write_matrix(path, {"params": {"train.beta": {"low": 0.3, "high": 0.001}}})
    with pytest.raises(MatrixError, match="must be below high"):
        load_matrix(path)
    write_matrix(path, {"params": {"lora.r": {"choices": [0, 8]}}})  # valid space, but r=0 is not a valid config
    m = load_matrix(path)
    problems = check_space(m.cells[0].runs[0], m.spec.tune)
    assert len(problems) == 1 and problems[0].startswith(
        "tune.params.lora.r = 0: lora.r: Input should be greater than or equal to 1")


def test_trial_config_alpha_follows_rank_at_the_matrix_ratio(tmp_path):
    m_path = tmp_path / "m.yaml"
    write_matrix(m_path, {})
    cfg = load_matrix(m_path).cells[0].runs[0].model_copy(update={})
    spec = TuneSpec()
    assert (cfg.lora.r, cfg.lora.alpha) == (16, 32)
    assert defaults(cfg, spec) == {"lora.r": 16, "train.beta": 0.04}  # the first trial is the matrix's own values
    tuned = trial_config(cfg, spec, {"lora.r": 4, "train.beta": 0.01})
    assert (tuned.lora.r, tuned.lora.alpha, tuned.train.beta) == (4, 8, 0.01)
    fixed = trial_config(cfg, spec.model_copy(update={"lora_alpha": "fixed"}), {"lora.r": 4})
    assert fixed.lora.alpha == 32
    assert trial_config(cfg, spec, defaults(cfg, spec)).run_id == cfg.run_id  # the matrix's values are the cell, exactly


# --- studies that train


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_model):
    """One study whose queued trials are: the matrix's values, a run that raises (its model folder
    does not exist), a second good run, and a learning rate that wrecks the model at once."""
    from harness.tuning import study as t
    tmp_path = tmp_path_factory.mktemp("planted")
    tune = {"params": {"model": {"choices": ["builtin:tiny-arith", str(tmp_path / "no-such-model")]},
                       "train.lr": {"choices": [1.0e-3, 2.0e-3, 0.05]}},
            "pruner": {"name": "median", "startup_trials": 2, "warmup_steps": 0}, "sampler": "random"}
    study = make_study(tmp_path, tune, trials=4)
    s, notes = t.create(study)
    assert notes == []
    s.enqueue_trial({"model": str(tmp_path / "no-such-model"), "train.lr": 1.0e-3})
    s.enqueue_trial({"model": "builtin:tiny-arith", "train.lr": 2.0e-3})
    s.enqueue_trial({"model": "builtin:tiny-arith", "train.lr": 0.05})
    lines = []
    t.work(study, 0, "cpu", on_trial=lambda tr: lines.append(t.trial_line(tr)))
    return study, t.load(study), lines


def test_a_failing_trial_fails_alone_and_the_pruner_stops_a_bad_one(planted):
    study, s, lines = planted
    trials = s.get_trials()
    assert [tr.state for tr in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.PRUNED], lines
    assert trials[0].params == {"model": "builtin:tiny-arith", "train.lr": 1.0e-3}  # the matrix's values go first
    # the run that raised was recorded, with its error, and the study went on
    failed = trials[1]
    assert failed.user_attrs["status"] == "failed" and "no-such-model" in failed.user_attrs["error"]
    assert read_json(study.run_dir(failed.user_attrs["run_id"]) / "summary.json")["status"] == "failed"
    # the wrecked trial was stopped at its first report below the others' median, and its run says so
    pruned = trials[3]
    at = max(pruned.intermediate_values)
    others = sorted(tr.intermediate_values[at] for tr in (trials[0], trials[2]))
    assert pruned.intermediate_values[at] < sum(others) / 2
    summary = read_json(study.run_dir(pruned.user_attrs["run_id"]) / "summary.json")
    assert summary["status"] == "pruned" and summary["steps_completed"] == at < study.cell_cfg.train.steps
    # finished trials report every evaluation (the pruner's evidence) and the final one is the objective
    assert sorted(trials[0].intermediate_values) == [4, 8, 12]
    assert trials[0].value == trials[0].intermediate_values[12] == trials[0].user_attrs["eval_end"]


def test_tuning_report_and_link_from_the_matrix_report(planted, tmp_path):
    from harness.reports.markdown import md
    from harness.tuning import study as t
    from harness.tuning.report import write_tune_report

    study, s, _ = planted
    path = write_tune_report(s, study, tmp_path / "reports")
    text, page = path.read_text(), path.with_suffix(".html").read_text()
    best = t.best_trials(s)[0]
    assert f"## Best\n\n- trial {best.number}: model=builtin:tiny-arith, train.lr={best.params['train.lr']:g}" in text
    assert text.split("## Trials")[1].count("\n| ") == 1 + 4  # header + one row per trial
    assert "\n| 3 | pruned |" in text and "\n| 1 | fail |" in text
    assert md(s.trials[1].user_attrs["error"]) in text  # the failed run's error, escaped for Markdown
    for plot in ("optimization-history.svg", "contour-of-model-x-train.lr.svg"):
        assert (path.with_suffix("") / plot).read_text().lstrip().startswith("<?xml")
    assert page.count("data:image/svg+xml;base64,") == 2  # the HTML embeds its plots: one file to send
    assert "Parameter importances" in page

    from harness.reports import write_report
    from harness.results.verdict import judge

    from synthetic import write_sweep

    root, _ = write_sweep(tmp_path / "results", "# make sweep MATRIX=m\naxes: {quant: [bf16]}\n", "m")
    judge(root)
    write_report(root, tmp_path / "reports" / "m")
    assert f"[s]({path.name})" in (tmp_path / "reports" / "m" / "report.md").read_text()
    assert "href='tune_s.html'" in (tmp_path / "reports" / "m" / "report.html").read_text()


def test_apply_writes_a_new_matrix_with_the_trial_as_a_cell(planted, tmp_path):
    from harness.tuning import study as t
    study, s, _ = planted
    original = tmp_path / "orig.yaml"
    original.write_text("# make sweep MATRIX=orig\n# a comment that must survive\n"
                        "base:\n  task: {name: arith, eval_size: 64}\n  train: " + yaml.safe_dump(TRAIN, default_flow_style=True)
                        + "axes:\n  quant: [bf16]   # axis comment\nbaseline: {quant: bf16}\n")
    with pytest.raises(ValueError, match="the matrix's own values"):  # trial 0: nothing to apply
        t.apply(original, {"quant": "bf16"}, study, s.trials[0], tmp_path / "orig-tuned.yaml")
    best = s.trials[2]  # lr 2e-3
    out = t.apply(original, {"quant": "bf16"}, study, best, tmp_path / "orig-tuned.yaml")
    text = out.read_text()
    assert (text.startswith("# make sweep MATRIX=orig-tuned") and "# a comment that must survive" in text
            and "# axis comment" in text)
    m = load_matrix(out)
    tuned = [c for c in m.cells if c.included]
    assert len(tuned) == 1 and tuned[0].label == f"tuned: study s, trial {best.number}"
    assert tuned[0].runs[0].run_id == trial_config(study.cell_cfg, study.spec, best.params).run_id
    assert m.baseline_of(tuned[0]).name == "quant=bf16"  # judged against the untuned baseline
    with pytest.raises(FileExistsError):
        t.apply(original, {"quant": "bf16"}, study, best, out)

    # a matrix that already has `include:` keeps its entries; the tuned one is added to them
    with_include = tmp_path / "inc.yaml"
    with_include.write_text(original.read_text()
                            + "include:\n  # the control\n  - quant: bf16\n    train.lr: 0.0\n    label: control\n")
    m2 = load_matrix(t.apply(with_include, {"quant": "bf16"}, study, best, tmp_path / "inc-tuned.yaml"))
    assert sorted(c.label for c in m2.cells if c.included) == ["control", f"tuned: study s, trial {best.number}"]
    flow = tmp_path / "flow.yaml"  # a flow-style list can't take a line: refused rather than shadowed by a second `include:`
    flow.write_text(original.read_text() + "include: [{quant: bf16, train.lr: 0.0, label: control}]\n")
    with pytest.raises(ValueError, match="block list"):
        t.apply(flow, {"quant": "bf16"}, study, best, tmp_path / "flow-tuned.yaml")


def test_a_study_refuses_another_space_under_its_name(planted):
    from harness.tuning import study as t
    study, _, _ = planted
    other = study.__class__(**(study.__dict__ | {"spec": study.spec.model_copy(update={"lora_alpha": "fixed"})}))
    with pytest.raises(t.StudyMismatch, match="another tune"):
        t.create(other)


def tune_cli(tmp_path, *args):
    # One torch thread: this tiny model trains as fast on one as on two, and a second thread makes every op wait
    # for a core another process may hold (3x slower with one core busy). --workers N sets 1 each itself.
    return subprocess.Popen([sys.executable, "-m", "harness", "tune", str(tmp_path / "m.yaml"), "--cell", "quant=bf16",
                             "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "reports"), "--device", "cpu",
                             *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})


def test_two_worker_processes_share_one_sqlite_study(tmp_path, tiny_model):
    from harness.tuning import study as t
    # no pruner: which trials a median pruner compares with depends on which worker finished first, a race
    study = make_study(tmp_path, {"trials": 4, "sampler": "random", "pruner": {"name": "none"}}, name="quant-bf16",
                       trials=4)
    proc = tune_cli(tmp_path, "--workers", "2")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    trials = [tr for tr in t.load(study).get_trials() if not tr.user_attrs.get("surplus")]  # a race past N gives its slot up
    assert [tr.state for tr in trials] == [TrialState.COMPLETE] * 4, out
    assert len({tr.user_attrs["worker"] for tr in trials}) == 2, "one worker did every trial"
    run_ids = [tr.user_attrs["run_id"] for tr in trials]
    assert len(set(run_ids)) == 4  # no trial ran twice, no two trials ran the same config
    for run_id in run_ids:
        assert [r["step"] for r in read_metrics(study.run_dir(run_id))] == list(range(13))
    assert (tmp_path / "reports" / "m" / "tune_quant-bf16.html").exists()


@pytest.mark.parametrize("journal", [False, True], ids=["sqlite", "journal"])
def test_a_killed_study_resumes_and_finishes(tmp_path, tiny_model, journal):
    """SIGKILL mid-trial; the same command again: the dead worker's trial is failed (its process is
    gone; on another host, its heartbeat stops) and queued again with its parameters, and its run
    continues from its last checkpoint. A journal file has no heartbeats, so the same-host check is all it has."""
    from harness.tuning import study as t
    study = make_study(tmp_path, {"trials": 2, "heartbeat_s": 1, "sampler": "random"}, name="quant-bf16", trials=2,
                       train={"steps": 20, "eval_every": 10, "checkpoint_every": 5})
    storage = ["--storage", str(tmp_path / "study.journal")] if journal else []
    if journal:
        study = study.__class__(**(study.__dict__ | {"storage": str(tmp_path / "study.journal")}))
    proc = tune_cli(tmp_path, *storage)
    runs = study.root
    # the row of step 6 is written after the checkpoint of step 5; then 14 steps are left, and the run is
    # frozen before it is checked, so the kill lands mid-trial however busy the machine
    wait_until(lambda: any(len(read_metrics(d)) >= 7 for d in (runs.iterdir() if runs.exists() else [])), proc,
               "the first trial's checkpoint at step 5")
    freeze([proc.pid], group=True)
    killed, = runs.iterdir()
    assert checkpoint.saved_step(killed) >= 5 and not (killed / "summary.json").exists()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    proc = tune_cli(tmp_path, *storage)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    trials = t.load(study).get_trials()
    done = [tr for tr in trials if tr.state == TrialState.COMPLETE]
    assert len(done) == 2 and [tr.state for tr in trials].count(TrialState.FAIL) == 1, out
    retry = next(tr for tr in done if tr.user_attrs["run_id"] == killed.name)
    assert t.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 0  # trial 0 again, same parameters
    assert retry.params == trials[0].params
    assert len(read_json(killed / "env.json")["resumed_at"]) == 1, "the killed run was restarted, not resumed"
    assert [r["step"] for r in read_metrics(killed)] == list(range(21))


def test_cli_refuses_before_training(tmp_path):
    from typer.testing import CliRunner

    from harness.cli import app

    runner = CliRunner()
    assert "LoRA rank and beta" in runner.invoke(app, ["--help"]).output + runner.invoke(app, ["tune", "--help"]).output
    args = ["--results", str(tmp_path / "results"), "--reports", str(tmp_path / "reports")]
    res = runner.invoke(app, ["tune", "smoke", "--cell", "quant=fp4", *args])
    assert res.exit_code == 2 and "matches 0 cells" in res.output and "quant=nf4" in res.output
    write_matrix(tmp_path / "m.yaml", {"params": {"lora.r": {"choices": [0, 8]}}})
    res = runner.invoke(app, ["tune", str(tmp_path / "m.yaml"), "--cell", "quant=bf16", *args])
    assert res.exit_code == 2 and "tune.params.lora.r = 0" in res.output
    write_matrix(tmp_path / "m.yaml", {})
    res = runner.invoke(app, ["tune", str(tmp_path / "m.yaml"), "--cell", "quant=bf16", "--apply", *args])
    assert res.exit_code == 2 and "no finished trial yet" in res.output
    assert not list(tmp_path.glob("*-tuned-*.yaml")) and not (tmp_path / "results" / "m" / "tune" / "quant-bf16").exists()


def test_tune_from_python_runs_the_study_and_says_what_it_found(tmp_path, tiny_model):
    import harness

    write_matrix(tmp_path / "m.yaml", {"trials": 2, "sampler": "random"}, {"steps": 4, "eval_every": 2, "checkpoint_every": 2})
    done = []
    result = harness.tune(tmp_path / "m.yaml", "quant=bf16", results=tmp_path / "results", reports=tmp_path / "reports",
                          device="cpu", on_trial=done.append)
    assert [t.number for t in done] == [0, 1], "each finished trial is reported as it finishes"
    assert result.report == tmp_path / "reports" / "m" / "tune_quant-bf16.md" and result.report.exists()
    assert len(result.best) == 1 and result.best[0].number in (0, 1) and result.requeued == []
    again = harness.tune(tmp_path / "m.yaml", "quant=bf16", results=tmp_path / "results", reports=tmp_path / "reports",
                         device="cpu")
    assert again.best[0].number == result.best[0].number, "a finished study resumes with nothing to run"


def test_a_queued_trial_handed_to_two_workers_keeps_the_result_of_the_one_that_ran_it(tmp_path, tiny_model, monkeypatch):
    """optuna on SQLite can pop one queued trial (the matrix's values) in two workers at once. The second copy finds
    the trial's folder locked by the first; it waits for the first to run and report, then gives up without a report
    of its own: before, it reported a failure first and the first worker's report raised (a crashed worker, a trial
    marked failed that had run). Two handles on one trial stand in for the two workers' copies."""
    import threading

    import optuna
    import torch

    from harness.common.files import locked
    from harness.tuning import study as t
    from harness.tuning.trial import RunFailed

    study = make_study(tmp_path, {"trials": 1, "sampler": "random"}, trials=1)
    s, _ = t.create(study)
    first = s.ask()  # worker A pops the queued trial and runs it: its run_id set, its folder locked
    cfg = trial_config(study.cell_cfg, study.spec, first.params)
    first.set_user_attr("run_id", cfg.run_id)
    run_dir = study.run_dir(cfg.run_id)
    run_dir.mkdir(parents=True)
    waiting, result = threading.Event(), {}
    await_copy = t.await_the_other_copy
    monkeypatch.setattr(t, "await_the_other_copy", lambda *a, **k: waiting.set() or await_copy(*a, **k))

    def second_copy():
        try:
            t.objective(optuna.trial.Trial(s, first._trial_id), study, torch.device("cpu"), lambda **kw: None)
        except RunFailed as e:
            result["error"] = str(e)

    with locked(run_dir / ".lock"):
        worker_b = threading.Thread(target=second_copy)
        worker_b.start()
        assert waiting.wait(timeout=60)  # B found the folder locked by this same trial
    s.tell(first, 0.75)  # A's run ended (its lock released) and A reports it
    worker_b.join(timeout=60)
    assert not worker_b.is_alive() and "second copy" in result["error"]
    frozen = s._storage.get_trial(first._trial_id)
    assert frozen.state == TrialState.COMPLETE and frozen.values == [0.75]
    with pytest.raises(ValueError, match="Cannot tell a COMPLETE trial"):  # B's report, refused; work() passes over it
        s.tell(optuna.trial.Trial(s, first._trial_id), state=TrialState.FAIL)
