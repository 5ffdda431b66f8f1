"""The `math` task: answers judged by math-verify (as TRL's and open-r1's accuracy rewards), on
hand-written LaTeX and GSM8K answers, and MATH's and GSM8K's JSONL forms read offline."""

import pytest

from harness.config.run import TaskConfig
from harness.tasks import MathTask, Problem, last_boxed

from conftest import FIXTURES


def test_last_boxed_keeps_nested_braces_and_takes_the_last():
    assert last_boxed("so \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{3} no wait \\boxed{7}") == "7"
    assert last_boxed("no box") is None and last_boxed("cut off \\boxed{\\frac{1}{") is None


@pytest.mark.parametrize("reference, completion, reward", [
    ("\\frac{1}{2}", "The answer is \\boxed{\\frac{1}{2}}.", 1.0),
    ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", 1.0),        # \dfrac
    ("\\frac{1}{2}", "\\boxed{0.5}", 1.0),                  # a decimal for a fraction
    ("\\frac{3}{4}", "\\boxed{\\frac34}", 1.0),             # LaTeX's short form
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", 1.0),              # equal values, other forms
    ("1000", "\\boxed{1,000}", 1.0),                        # thousands commas
    ("18", "She pays \\boxed{\\$18}", 1.0),                 # a unit sign
    ("18", "\\boxed{18 \\text{ dollars}}", 1.0),            # a unit word
    ("4", "\\boxed{x = 4}", 1.0),                           # an equation naming the variable
    ("7", "\\boxed{3} no wait \\boxed{7}", 1.0),            # the last box counts, as in the boxed task
    ("7", "\\boxed{7} no wait \\boxed{3}", 0.0),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", 0.0),
    ("18", "\\boxed{19}", 0.0),
    ("7", "the answer is 7", 0.0),                          # unboxed: the prompt asks for \boxed{}
    ("7", "\\boxed{7", 0.0),                                # cut off inside the box
])
def test_math_verify_reward(reference, completion, reward):
    task = MathTask.__new__(MathTask)  # the reward alone: no data to load
    assert task.reward(Problem("q", reference), completion) == reward


def test_math_and_gsm8k_jsonl_load_with_their_references():
    math = MathTask(TaskConfig(name="math", source=str(FIXTURES / "math_sample.jsonl"), eval_size=1))
    got = {p.answer for p in math.train + math.eval}
    assert got == {"\\frac{1}{2}", "2\\sqrt{2}", "4", "5"}
    assert all(p.prompt.endswith("\\boxed{}.\n") for p in math.train)
    assert all(math.reward(p, p.solution) == 1.0 for p in math.train + math.eval), "the worked solutions score 1"
    gsm = MathTask(TaskConfig(name="math", source=str(FIXTURES / "boxed_sample.jsonl"), eval_size=1))
    assert {"7", "36", "300"} <= {p.answer for p in gsm.train + gsm.eval}
    assert all(gsm.reward(p, p.solution) == 1.0 for p in gsm.train + gsm.eval)


def test_a_math_row_without_its_fields_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "solution": "\\\\boxed{2}"}\n{"problem": "2+2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: needs 'question' and 'answer' \(GSM8K\) or 'problem' and 'solution'"):
        MathTask(TaskConfig(name="math", source=str(bad), eval_size=1))
