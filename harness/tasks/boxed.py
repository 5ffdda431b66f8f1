"""`boxed` and `math`: GSM8K- and MATH-style problems from a JSONL file or an HF dataset, the answer in \\boxed{}."""

from __future__ import annotations

import json
import re
from pathlib import Path

from harness.config.run import TaskConfig
from harness.tasks.problem import Problem, split

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
        self.train, self.eval = split(problems, cfg.eval_size)

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

    def formatted(self, completion: str) -> bool:
        """A closed \\boxed{...} (nested braces and all), right or wrong; MathTask's too."""
        return last_boxed(completion) is not None


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


def jsonl_size(source: str) -> int | None:
    """Non-empty lines of the local file `source`, found as BoxedTask._load finds it (relative to the
    working directory); None where it is not a file (an HF dataset id) or a name the OS refuses."""
    try:
        with Path(source).open("rb") as f:
            return sum(1 for line in f if line.strip())
    except (OSError, ValueError):
        return None
