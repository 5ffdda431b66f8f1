"""`tune.seeds_per_trial`: a trial's objective is the mean of the verdicts' final score over its seeds,
and the tuning report says which differences between trials those seeds resolve."""

import statistics

import pytest
import yaml
from optuna.trial import TrialState

from harness.config.matrix import MatrixError, load_matrix
from harness.config.tune_space import TuneSpec, trial_seeds
from harness.results.layout import read_json, read_metrics
from harness.results.verdict import difference
from harness.tuning.differences import compare, rule

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def write_matrix(path, tune: dict, seeds=(0, 1)) -> None:
    path.write_text("# harness tune " + path.stem + " --cell quant=bf16\n" + yaml.safe_dump({
        "base": {"task": {"name": "arith", "eval_size": 32},
                 "train": {"steps": 4, "prompts_per_step": 4, "group_size": 4, "eval_every": 2, "checkpoint_every": 2}},
        "axes": {"quant": ["bf16"]},
        "seeds": list(seeds),
        "criteria": {"final_window": 0.5},  # the final score is the mean of the evals at steps 2 and 4, not the last one
        "tune": tune,
    }))


# --- the field


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "two", 65])
def test_seeds_per_trial_is_validated(tmp_path, bad):
    write_matrix(tmp_path / "m.yaml", {"seeds_per_trial": bad})
    with pytest.raises(MatrixError, match="tune.*seeds_per_trial"):
        load_matrix(tmp_path / "m.yaml")


def test_seeds_per_trial_defaults_to_one_and_takes_the_matrix_seeds_in_order(tmp_path):
    assert TuneSpec().seeds_per_trial == 1
    write_matrix(tmp_path / "m.yaml", {"seeds_per_trial": 3}, seeds=(5, 2))
    assert load_matrix(tmp_path / "m.yaml").spec.tune.seeds_per_trial == 3
    assert trial_seeds((5, 2), 1) == (5,)
    assert trial_seeds((5, 2), 2) == (5, 2)
    assert trial_seeds((5, 2), 4) == (5, 2, 6, 7)  # more than the matrix lists: the integers after its largest


# --- resolved or not, on hand-made trial data (no training)


def test_one_seed_per_trial_resolves_nothing():
    rows = compare({0: {0: 0.60}, 1: {0: 0.40}, 2: {0: 0.10}}, best=0, confidence=0.9)
    assert [r.number for r in rows] == [0, 1, 2] and not any(r.resolved for r in rows)
    assert all(r.text.startswith("not resolved: one seed per trial") for r in rows[1:])
    assert "no difference between trials can be resolved" in rule(0.9, 1)


def test_a_difference_is_resolved_when_the_one_sided_bounds_exclude_zero():
    best = {0: 0.60, 1: 0.64, 2: 0.62}
    worse = {0: 0.50, 1: 0.55, 2: 0.51}  # 0.10 below on every seed: paired bounds well under 0
    close = {0: 0.61, 1: 0.60, 2: 0.63}  # as often above as below
    welch = {7: 0.40, 8: 0.45, 9: 0.43}  # other seeds: unpaired
    rows = {r.number: r for r in compare({0: close, 1: best, 2: worse, 3: welch}, best=1, confidence=0.9,
                                         labels={0: "the matrix's values"})}
    assert rows[1].label == "the best" and rows[1].diff is None and rows[0].label == "the matrix's values"
    d = difference(worse, best, 0.9)  # the verdicts' own statistics
    assert rows[2].diff == d and d.paired and d.upper < 0
    assert rows[2].resolved and rows[2].text.startswith(f"resolved: worse than the best (Δ {d.mean:+.3f}, 90% one-sided "
                                                        f"bounds [{d.lower:+.3f}, {d.upper:+.3f}]")
    assert not rows[0].resolved and rows[0].diff.lower < 0 < rows[0].diff.upper
    assert rows[0].text.startswith("not resolved from 3 seeds (Δ -0.007")
    assert rows[3].resolved and not rows[3].diff.paired and "Welch" in rows[3].text
    assert "both one-sided 90% bounds lie on one side of 0" in rule(0.9, 3)


def test_the_matrix_values_are_compared_wherever_they_rank():
    scores = {n: {0: 0.9 - n / 100, 1: 0.9 - n / 100} for n in range(8)}
    rows = compare(scores, best=0, confidence=0.9, labels={7: "the matrix's values"}, top=3)
    assert [r.number for r in rows] == [0, 1, 2, 7]
    partial = compare({0: {0: 0.6, 1: 0.6}, 1: {0: 0.5}}, best=0, confidence=0.9)  # one seed on a side: no test
    assert partial[1].text == "not resolved: 1 seed here and 2 seeds in the best, and a test needs 2 on each side"


# --- a study that trains: 2 seeds per trial


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, tiny_model):
    """Trials of 2 seeds: the matrix's values, a second learning rate, and one that wrecks the model
    (pruned on its first seed)."""
    from harness.tuning import study as t
    from harness.tuning.session import open_session

    tmp_path = tmp_path_factory.mktemp("seeded")
    write_matrix(tmp_path / "m.yaml", {"params": {"train.lr": {"choices": [1.0e-3, 2.0e-3, 0.05]}}, "sampler": "random",
                                       "seeds_per_trial": 2, "pruner": {"name": "median", "startup_trials": 2}})
    m = load_matrix(tmp_path / "m.yaml")
    session = open_session(m, m.cells[0], trials=3, results=tmp_path / "results")
    assert session.study.trial_seeds == (0, 1) and session.notes == []
    session.optuna_study.enqueue_trial({"train.lr": 2.0e-3})
    session.optuna_study.enqueue_trial({"train.lr": 0.05})
    t.work(session.study, 0, "cpu", on_trial=lambda tr: None)
    return session, tmp_path


def final_score(run_dir, window=0.5) -> float:
    """The final score from the run's own metrics.jsonl: its evals after step 0 in the last half of training."""
    evals = [(r["step"], r["eval/reward"]) for r in read_metrics(run_dir) if "eval/reward" in r and r["step"] > 0]
    return statistics.fmean(x for s, x in evals if s >= evals[-1][0] * (1 - window))


def test_the_objective_is_the_mean_of_the_seeds_final_scores(seeded):
    from harness.tuning import study as t

    session, _ = seeded
    study = session.study
    trials = t.load(study).get_trials()
    assert [tr.state for tr in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    for tr in trials[:2]:
        runs = {int(seed): study.run_dir(run_id) for seed, run_id in tr.user_attrs["seed_runs"].items()}
        assert sorted(runs) == [0, 1] and tr.user_attrs["run_id"] == runs[0].name
        assert [read_json(d / "config.json")["seed"] for d in runs.values()] == [0, 1]
        scores = {seed: final_score(d) for seed, d in runs.items()}
        assert tr.user_attrs["seed_scores"] == {str(s): pytest.approx(x) for s, x in scores.items()}
        assert tr.value == pytest.approx(statistics.fmean(scores.values()))
        # the pruner saw seed 1's evals after seed 0's, each the mean over the seeds so far at that training step
        evals = {seed: {r["step"]: r["eval/reward"] for r in read_metrics(d) if "eval/reward" in r} for seed, d in runs.items()}
        assert tr.intermediate_values == pytest.approx({2: evals[0][2], 4: evals[0][4], 6: (evals[0][2] + evals[1][2]) / 2,
                                                        8: (evals[0][4] + evals[1][4]) / 2})
    pruned = trials[2]  # stopped on its first seed: the second never started
    assert max(pruned.intermediate_values) <= 4 and pruned.user_attrs["status"] == "pruned"
    assert not study.run_dir(pruned.user_attrs["seed_runs"]["1"]).exists()


def test_a_rerun_of_the_same_parameters_trains_nothing_again(seeded):
    from harness.tuning import study as t

    session, _ = seeded
    study = session.study
    first = t.load(study).get_trials()[0]
    runs = [study.run_dir(r) for r in first.user_attrs["seed_runs"].values()]
    files = lambda: [(d / name).read_bytes() for d in runs for name in ("metrics.jsonl", "env.json", "summary.json")]  # noqa: E731
    before = files()
    more = study.__class__(**(study.__dict__ | {"trials": 4}))
    s = t.load(more)
    s.enqueue_trial(first.params)  # what a retried trial is: the same parameters again
    t.work(more, 0, "cpu", on_trial=lambda tr: None)
    again = t.load(more).get_trials()[-1]
    assert again.state == TrialState.COMPLETE and again.value == first.value
    assert again.user_attrs["seed_scores"] == first.user_attrs["seed_scores"]  # each seed once
    assert files() == before  # neither seed trained again, nor was resumed


def test_the_report_says_which_differences_are_resolved(seeded):
    from harness.reports.markdown import md
    from harness.tuning import study as t
    from harness.tuning.report import summary, write_tune_report

    session, tmp_path = seeded
    s = t.load(session.study)
    path = write_tune_report(s, session.study, tmp_path / "reports")
    text, page = path.read_text(), path.with_suffix(".html").read_text()
    rows = summary(s, session.study)["differences"]
    assert [r.number for r in rows][0] == t.best_trials(s)[0].number and {r.number for r in rows} >= {0, 1}
    assert "## Differences from the best" in text and "id='differences'" in page
    assert md(rule(0.9, 2)) in text
    assert any(r.label.endswith("the matrix's values") for r in rows)
    for r in rows[1:]:
        assert md(r.text) in text and (r.text.startswith("resolved") == r.resolved)
        assert r.diff is not None and r.diff.paired  # same two seeds on both sides
    assert "averaged over the trial's 2 seeds 0, 1" in text


def test_a_study_refuses_another_scoring_and_says_when_it_adds_seeds(seeded, tmp_path):
    from harness.config.matrix import Criteria
    from harness.tuning import study as t
    from harness.tuning.session import open_session

    session, _ = seeded
    study = session.study
    window = study.__class__(**(study.__dict__ | {"criteria": Criteria(final_window=0.25)}))
    with pytest.raises(t.StudyMismatch, match="another score"):
        t.create(window)
    more = study.__class__(**(study.__dict__ | {"spec": study.spec.model_copy(update={"seeds_per_trial": 3})}))
    with pytest.raises(t.StudyMismatch, match="another tune and score"):
        t.create(more)
    write_matrix(tmp_path / "m.yaml", {"seeds_per_trial": 3}, seeds=(4,))
    m = load_matrix(tmp_path / "m.yaml")
    fresh = open_session(m, m.cells[0], results=tmp_path / "results")
    assert fresh.study.trial_seeds == (4, 5, 6)
    assert fresh.notes == ["tune.seeds_per_trial 3 is more than the cell's 1 seed(s): trials also train seed(s) 5, 6"]
