"""The `reasoning_gym` task on real reasoning-gym datasets: a held-out split fixed whatever the run's seed,
the dataset's own verifier on the <answer>, demonstrations that score 1, validation that names the field
and the valid choices; and every task's `formatted` (what task.format_reward rewards) on hand-written cases."""

import pytest
import torch

from harness.config.extras import extras_for
from harness.config.matrix import MatrixError, load_matrix
from harness.config.preflight import check_run
from harness.config.run import RolloutConfig, RunConfig, TaskConfig
from harness.execution.lifecycle import run_one
from harness.registries import TASKS
from harness.tasks import ANSWER_INSTRUCTION, ArithTask, BoxedTask, GymTask, MathTask, Problem, check_gym, load_task, task_size

from conftest import tiny_run_config

# two terms of one or two digits: prompts of ~110 characters, answers of at most 3 (-98 .. 198)
CHAIN_SUM = {"size": 600, "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}


def chain_sum(eval_size: int = 50, **options) -> TaskConfig:
    return TaskConfig(name="reasoning_gym", source="chain_sum", eval_size=eval_size, options=CHAIN_SUM | options)


@pytest.fixture(scope="module")
def task() -> GymTask:
    return GymTask(chain_sum())


def test_the_held_out_split_is_fixed_distinct_and_disjoint(task):
    assert TASKS.get("reasoning_gym") is GymTask
    again = load_task(RunConfig(seed=7, task=chain_sum()).task)  # another construction, another run seed
    assert [p.prompt for p in again.eval] == [p.prompt for p in task.eval]
    assert [p.prompt for p in again.train] == [p.prompt for p in task.train]
    assert len(task.eval) == 50 and len({p.prompt for p in task.eval}) == 50
    assert not {p.prompt for p in task.train} & {p.prompt for p in task.eval}
    assert len(task.train) > 400  # 600 generated, less the held-out prompts and their repeats
    first = GymTask(chain_sum(eval_size=10))  # the held-out set is the first eval_size distinct problems
    assert [p.prompt for p in first.eval] == [p.prompt for p in task.eval[:10]]


def test_prompts_are_the_dataset_question_and_the_answer_instruction(task):
    p = task.eval[1]
    assert p.prompt == "State the final answer to the following arithmetic problem: 60 - 29 =" + ANSWER_INSTRUCTION
    assert p.answer == "31" and p.entry["metadata"]["source_dataset"] == "chain_sum"
    assert all(len(p.prompt) <= 115 and "\n" not in p.prompt for p in task.train + task.eval)


@pytest.mark.parametrize("completion, reward", [
    ("<answer>31</answer>", 1.0),
    ("60 - 29 is 31, so <answer> 31 </answer>", 1.0),
    ("<answer>30</answer> no: <answer>31</answer>", 1.0),  # the last answer counts
    ("<answer>31</answer> no: <answer>30</answer>", 0.0),
    ("<answer>32</answer>", 0.0),
    ("<answer></answer>", 0.0),
    ("31", 0.0),  # no tags
    ("<answer>31", 0.0),  # cut off before the closing tag
])
def test_reward_is_the_datasets_verifier_on_the_answer(task, completion, reward):
    assert task.reward(task.eval[1], completion) == reward


def test_a_problem_without_its_entry_is_scored_on_its_answer(task):
    assert task.reward(Problem("q", "31"), "<answer>31</answer>") == 1.0
    assert task.reward(Problem("q", "31"), "<answer>13</answer>") == 0.0


def test_demonstrations_score_one_and_are_formatted(task):
    for p in task.eval + task.train[:100]:
        demo = task.demonstration(p)
        assert demo == f"<answer>{p.answer}</answer>" and task.reward(p, demo) == 1.0 and task.formatted(demo)


def test_a_dataset_without_reference_answers_has_no_demonstration():
    t = GymTask(TaskConfig(name="reasoning_gym", source="graph_color", eval_size=2, options={"size": 5}))
    with pytest.raises(ValueError, match="graph_color has no reference answer"):
        t.demonstration(t.eval[0])


def test_task_size_is_the_options_size_or_the_datasets_default():
    assert task_size(chain_sum()) == 600
    assert task_size(TaskConfig(name="reasoning_gym", source="chain_sum")) == 500


@pytest.mark.parametrize("source, options, message", [
    (None, {}, r"task.source: the reasoning_gym task needs a reasoning-gym dataset name; valid: .*chain_sum"),
    ("chainsum", {}, r"task.source: unknown reasoning-gym dataset 'chainsum'; did you mean chain_sum.* Valid: ab, .*countdown"),
    ("composite", {}, r"task.source: reasoning-gym's composite is not supported"),
    ("chain_sum", {"max_term": 2}, r"task.options: chain_sum has no option 'max_term' \(did you mean max_terms\?\); "
                                   r"its options: min_terms, max_terms, min_digits, max_digits, allow_negation, size$"),
    ("chain_sum", {"seed": 3}, r"task.options.seed: the harness fixes reasoning-gym's seed"),
    ("chain_sum", {"min_terms": "two"}, r"task.options.min_terms: chain_sum's min_terms is an integer, not 'two'"),
    ("chain_sum", {"allow_negation": 1}, r"task.options.allow_negation: chain_sum's allow_negation is a boolean, not 1"),
    ("chain_sum", {"min_terms": 3, "max_terms": 2},
     r"task.options: reasoning-gym's chain_sum refuses .*max_terms must be >= min_terms"),
    ("basic_arithmetic", {"format_style": "fancy"}, r"task.options.format_style: .* one of 'simple', 'natural', not 'fancy'"),
    ("basic_arithmetic", {"operators": "+"}, r"task.options.operators: basic_arithmetic's operators is a list \(list\[str\]\), "
                                             r"not '\+'"),
    ("basic_arithmetic", {"operators": ["+", 5]}, r"task.options.operators: basic_arithmetic's operators is a list of a string"),
])
def test_bad_names_and_options_name_the_field_and_the_choices(source, options, message):
    cfg = TaskConfig(name="reasoning_gym", source=source, options=options)
    assert check_gym(cfg) is not None
    with pytest.raises(ValueError, match=message):
        GymTask(cfg)
    assert [m for m in check_run(RunConfig(task=cfg)) if m.startswith("task.")] == [check_gym(cfg)]


def test_options_for_another_task_are_an_error():
    problems = check_run(RunConfig(task=TaskConfig(name="arith", options={"size": 10})))
    assert problems == ["task.options: only the reasoning_gym task reads options (its dataset's config); "
                        "the arith task would ignore them: remove them"]


def test_a_matrix_is_checked_before_it_runs_and_needs_the_gym_extra(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "m.yaml"
    path.write_text("base: {task: {name: reasoning_gym, source: chain_sum, eval_size: 20, "
                    "options: {size: 100, max_terms: 2, allow_negation: false}}}\n")
    assert extras_for(load_matrix(path)) == ["gym"]
    for bad, field in (("source: chainsum", "task.source: unknown reasoning-gym dataset 'chainsum'; did you mean chain_sum"),
                       ("source: chain_sum, options: {max_term: 2}", "task.options: chain_sum has no option 'max_term'"),
                       ("source: chain_sum", "task.eval_size: 500 held-out prompts, but the reasoning_gym task has 500 "
                                             "problems")):  # eval_size's default, and the dataset's size
        path.write_text(f"base: {{task: {{name: reasoning_gym, {bad}}}}}\n")
        with pytest.raises(MatrixError, match=field):
            load_matrix(path)


def test_too_few_distinct_problems_for_the_held_out_set_is_an_error():
    # one-digit terms: 200 distinct sums and differences, of which 300 draws repeat many
    with pytest.raises(ValueError, match=r"task.eval_size: 190 held-out prompts, but 300 problems of chain_sum hold 1\d\d "
                                         r"distinct ones before training's 0: lower task.eval_size or raise task.options.size"):
        GymTask(chain_sum(eval_size=190, size=300, max_digits=1))


@pytest.mark.parametrize("algorithm", ["grpo", "sft"])
def test_a_run_trains_on_a_reasoning_gym_task(tmp_path, tiny_model, algorithm):
    cfg = tiny_run_config(steps=2, prompts_per_step=2, eval_every=2).model_copy(update={
        "algorithm": algorithm, "task": chain_sum(eval_size=4, size=40).model_copy(update={"format_reward": 0.5}),
        "rollout": RolloutConfig(max_new_tokens=24)})
    s = run_one(cfg, tmp_path / cfg.run_id, torch.device("cpu"))
    assert s["status"] == "ok", s.get("traceback")
    assert s["eval_start"] is not None and s["steps_completed"] == 2


@pytest.mark.parametrize("completion, formatted", [
    ("81", True), (" 81 ", True), ("7", True),
    ("", False), ("81<pad>", False), ("8 1", False), ("-5", False), ("eighty", False), ("²", False),
])
def test_arith_formatted_is_digits_alone(completion, formatted):
    assert ArithTask.formatted(None, completion) is formatted


@pytest.mark.parametrize("completion, formatted", [
    ("so \\boxed{7}", True), ("\\boxed{\\frac{1}{2}}.", True), ("\\boxed{}", True), ("\\boxed{wrong} text", True),
    ("7", False), ("\\boxed{7", False), ("\\boxed{\\frac{1}{2}", False), ("\\boxed{3} then \\boxed{", False), ("boxed{7}", False),
])
def test_boxed_and_math_formatted_is_a_closed_box(completion, formatted):
    assert BoxedTask.formatted(None, completion) is formatted and MathTask.formatted(None, completion) is formatted


@pytest.mark.parametrize("completion, formatted", [
    ("<answer>31</answer>", True), ("think <answer> wrong </answer>", True), ("<answer></answer>", True),
    ("31", False), ("<answer>31", False), ("31</answer>", False), ("<answer 31>", False), ("\\boxed{31}", False),
])
def test_gym_formatted_is_a_closed_answer_tag(task, completion, formatted):
    assert task.formatted(completion) is formatted
