"""Tasks: prompts, a disjoint held-out set, and a reward. Looked up by name in registries.TASKS."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from harness.config.run import TaskConfig
from harness.task_base import Task

SPLIT_SEED = 1234  # fixed: the held-out set must not move with the run's seed


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str  # what the reward compares with
    solution: str = ""  # a worked reference completion, where the source has one (the sft recipe imitates it)


def _split(problems: list[Problem], eval_size: int) -> tuple[list[Problem], list[Problem]]:
    if eval_size >= len(problems):
        raise ValueError(f"task.eval_size={eval_size} leaves no training prompts ({len(problems)} problems)")
    shuffled = problems[:]
    random.Random(SPLIT_SEED).shuffle(shuffled)
    return shuffled[eval_size:], shuffled[:eval_size]


ARITH_OPERANDS = range(10, 100)


class ArithTask:
    """`23+58=` -> `81`. Reward 1.0 for the exact answer (the completion up to end-of-sequence). A task_base.Task."""

    train: list[Problem]
    eval: list[Problem]

    def __init__(self, cfg: TaskConfig = TaskConfig()):
        problems = [Problem(f"{a}+{b}=", str(a + b)) for a in ARITH_OPERANDS for b in ARITH_OPERANDS]
        self.train, self.eval = _split(problems, cfg.eval_size)

    def reward(self, problem: Problem, completion: str) -> float:
        return float(completion.strip() == problem.answer)

    def demonstration(self, problem: Problem) -> str:
        """The completion the sft recipe imitates: the answer alone, as the reward wants it."""
        return problem.answer


BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
INSTRUCTION = "\nPut the final answer in \\boxed{}.\n"


def normalize_number(text: str) -> str:
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else str(value)


class BoxedTask:
    """GSM8K-style problems; the reward is 1.0 when the last \\boxed{...} equals the reference.

    `task.source` is a local JSONL file (one {"question", "answer"} object per line, GSM8K's
    "... #### 42" answers accepted, or MATH's {"problem", "solution"}) or, online, an HF dataset id
    loaded with `datasets`. A task_base.Task.
    """

    train: list[Problem]
    eval: list[Problem]

    def __init__(self, cfg: TaskConfig):
        if not cfg.source:
            raise ValueError("task.source: the boxed task needs a JSONL file or an HF dataset id")
        rows = self._load(cfg.source)
        problems = [Problem(r["question"].strip() + INSTRUCTION, self.reference(r["answer"]), self.solution(r["answer"]))
                    for r in rows]
        self.train, self.eval = _split(problems, cfg.eval_size)

    @staticmethod
    def _load(source: str) -> list[dict]:
        path = Path(source)
        if path.exists():
            rows = []
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    row = _as_qa(json.loads(line))
                    if row is None:
                        raise ValueError(f"{path}:{i}: needs 'question' and 'answer' (GSM8K) or 'problem' and 'solution' "
                                         f"(MATH) fields, has {sorted(json.loads(line))}")
                    rows.append(row)
            return rows
        try:
            import datasets
        except ImportError:
            raise ValueError(f"task.source {source!r} is not a file; "
                             "loading it from the HF hub needs `pip install quant-rl-harness[eval]`") from None
        name, _, config = source.partition(":")  # "openai/gsm8k:main"
        return [row for r in datasets.load_dataset(name, config or None, split="train") if (row := _as_qa(r))]

    @staticmethod
    def reference(answer: str) -> str:
        answer = str(answer)
        if "####" in answer:
            answer = answer.split("####")[-1]
        boxed = BOXED.findall(answer)
        return normalize_number(boxed[-1] if boxed else answer)

    @staticmethod
    def solution(answer: str) -> str:
        """GSM8K's worked answer with its final "#### 42" written as the reward reads it, \\boxed{42}."""
        answer = str(answer).strip()
        if BOXED.search(answer):
            return answer
        work, sep, final = answer.rpartition("####")
        if not sep:
            return f"\\boxed{{{normalize_number(answer)}}}"
        return f"{work.strip()}\nThe answer is \\boxed{{{normalize_number(final)}}}.".lstrip()

    def demonstration(self, problem: Problem) -> str:
        return problem.solution

    def reward(self, problem: Problem, completion: str) -> float:
        found = BOXED.findall(completion)
        return float(bool(found) and normalize_number(found[-1]) == problem.answer)


def task_size(cfg: TaskConfig) -> int | None:
    """Problems the task has before its train/held-out split, without building them; None where that
    is only known once loaded (an HF dataset). A local JSONL file counts its non-empty lines."""
    if cfg.name == "arith":
        return len(ARITH_OPERANDS) ** 2
    if cfg.name not in ("boxed", "math") or not cfg.source:
        return None
    try:  # as _load finds the file: relative to the working directory
        with Path(cfg.source).open("rb") as f:
            return sum(1 for line in f if line.strip())
    except (OSError, ValueError):  # not a file (an HF dataset id), or a name the OS refuses
        return None


def load_task(cfg: TaskConfig) -> Task:
    from harness.registries import TASKS

    return TASKS.get(cfg.name)(cfg)


def last_boxed(text: str) -> str | None:
    """What the last \\boxed{...} of `text` holds, nested braces and all (\\boxed{\\frac{1}{2}}); None without one."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unclosed: the completion was cut off inside its answer


class MathTask(BoxedTask):
    """Math problems whose answers are LaTeX (MATH) or numbers (GSM8K), judged by math-verify: the last
    \\boxed{...} of a completion against the reference, as TRL's and open-r1's accuracy rewards judge
    them, so that \\frac{1}{2}, \\dfrac12 and 0.5, or 1,000 and 1000, are one answer. `task.source` as
    for `boxed`. Needs `pip install -e '.[math]'`."""

    def __init__(self, cfg: TaskConfig):
        require_math_verify()
        super().__init__(cfg)

    @staticmethod
    def reference(answer: str) -> str:
        answer = str(answer)
        if "####" in answer:  # GSM8K: the number after ####, without its thousands commas
            return answer.split("####")[-1].strip().replace(",", "")
        boxed = last_boxed(answer)
        return (boxed if boxed is not None else answer).strip()

    @staticmethod
    def solution(answer: str) -> str:
        answer = str(answer).strip()
        if last_boxed(answer) is not None:
            return answer
        return BoxedTask.solution(answer)

    def reward(self, problem: Problem, completion: str) -> float:
        from math_verify import parse, verify

        found = last_boxed(completion)
        if found is None:
            return 0.0
        gold, pred = parse(f"${problem.answer}$"), parse(f"\\boxed{{{found}}}")
        return float(bool(gold) and bool(pred) and verify(gold, pred))


def require_math_verify() -> None:
    import importlib.util

    if importlib.util.find_spec("math_verify") is None:
        raise ValueError("task math: its reward is math-verify's; pip install -e '.[math]'")


def _as_qa(row: dict) -> dict | None:
    """A GSM8K row as it is, a MATH row ({"problem", "solution"}) as question/answer; None for neither."""
    if {"question", "answer"} <= row.keys():
        return row
    if {"problem", "solution"} <= row.keys():
        return {"question": row["problem"], "answer": row["solution"]}
    return None
