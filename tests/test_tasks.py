import pytest
import torch

from harness.config.run import TaskConfig
from harness.execution.lifecycle import run_one
from harness.tasks import ArithTask, BoxedTask, Problem

from conftest import FIXTURES, tiny_run_config

SAMPLE = str(FIXTURES / "boxed_sample.jsonl")


def test_arith_split_is_disjoint_and_fixed():
    a, b = ArithTask(TaskConfig()), ArithTask(TaskConfig())
    assert len(a.eval) == 500 and len(a.train) == 8100 - 500
    assert not {p.prompt for p in a.train} & {p.prompt for p in a.eval}
    assert a.eval == b.eval


def test_arith_reward_is_exact():
    t, p = ArithTask(TaskConfig()), Problem("23+58=", "81")
    assert t.reward(p, "81") == 1.0 and t.reward(p, " 81 ") == 1.0
    assert t.reward(p, "811") == 0.0 and t.reward(p, "8") == 0.0 and t.reward(p, "81<pad>") == 0.0


def test_boxed_loads_fixture_and_parses_references():
    t = BoxedTask(TaskConfig(name="boxed", source=SAMPLE, eval_size=2))
    assert len(t.train) == 4 and len(t.eval) == 2
    answers = sorted(p.answer for p in t.train + t.eval)
    assert answers == sorted(["7", "36", "300", "11", "30", "4.5"])
    assert all(p.prompt.endswith("\\boxed{}.\n") for p in t.train)


@pytest.mark.parametrize("completion, reward", [
    ("so the answer is \\boxed{7}", 1.0),
    ("\\boxed{7.0}", 1.0),
    ("\\boxed{ 7 }", 1.0),
    ("\\boxed{3} no wait \\boxed{7}", 1.0),  # the last box counts
    ("\\boxed{8}", 0.0),
    ("7", 0.0),  # unboxed
])
def test_boxed_reward(completion, reward):
    assert BoxedTask.reward(None, Problem("q", "7"), completion) == reward


def test_boxed_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="task.source"):
        BoxedTask(TaskConfig(name="boxed"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "1"}\n{"q": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: needs 'question' and 'answer'"):
        BoxedTask(TaskConfig(name="boxed", source=str(bad)))


def test_grpo_runs_on_the_boxed_fixture(tmp_path, tiny_model):
    cfg = tiny_run_config(steps=2, prompts_per_step=2, eval_every=2)
    cfg = cfg.model_copy(update={"task": TaskConfig(name="boxed", source=SAMPLE, eval_size=2)})
    s = run_one(cfg, tmp_path / cfg.run_id, torch.device("cpu"))
    assert s["status"] == "ok", s.get("traceback")
    assert s["eval_start"] is not None and s["steps_completed"] == 2
