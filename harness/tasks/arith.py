"""`arith`: two-digit addition made locally, exact-answer reward."""

from __future__ import annotations

import re

from harness.config.run import TaskConfig
from harness.tasks.problem import Problem, split

ARITH_OPERANDS = range(10, 100)
DIGITS = re.compile(r"[0-9]+")


class ArithTask:
    """`23+58=` -> `81`. Reward 1.0 for the exact answer (the completion up to end-of-sequence). A task_base.Task."""

    train: list[Problem]
    eval: list[Problem]

    def __init__(self, cfg: TaskConfig = TaskConfig()):
        problems = [Problem(f"{a}+{b}=", str(a + b)) for a in ARITH_OPERANDS for b in ARITH_OPERANDS]
        self.train, self.eval = split(problems, cfg.eval_size)

    def reward(self, problem: Problem, completion: str) -> float:
        return float(completion.strip() == problem.answer)

    def demonstration(self, problem: Problem) -> str:
        """The completion the sft recipe imitates: the answer alone, as the reward wants it."""
        return problem.answer

    def formatted(self, completion: str) -> bool:
        """A number and nothing else (ASCII digits, surrounding whitespace aside), right or wrong."""
        return DIGITS.fullmatch(completion.strip()) is not None
