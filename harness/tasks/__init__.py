"""Tasks: prompts, a disjoint held-out set, and a reward. Looked up by name in registries.TASKS.

One module per kind: arith (made locally), boxed (`boxed` and `math`: GSM8K and MATH from JSONL or
the HF hub), gym (`reasoning_gym`); problem holds what they share. Everything is importable from here.
"""

from __future__ import annotations

from harness.config.run import TaskConfig
from harness.task_base import Task
from harness.tasks.arith import ARITH_OPERANDS, ArithTask
from harness.tasks.boxed import (
    BOXED,
    INSTRUCTION,
    BoxedTask,
    MathTask,
    jsonl_size,
    last_boxed,
    normalize_number,
    require_math_verify,
)
from harness.tasks.gym import ANSWER_INSTRUCTION, GymTask, check_gym, gym_datasets, gym_size, last_answer, require_reasoning_gym
from harness.tasks.problem import SPLIT_SEED, Problem, split

__all__ = ["ANSWER_INSTRUCTION", "ARITH_OPERANDS", "BOXED", "INSTRUCTION", "SPLIT_SEED", "ArithTask", "BoxedTask", "GymTask",
           "MathTask", "Problem", "check_gym", "gym_datasets", "gym_size", "jsonl_size", "last_answer", "last_boxed",
           "load_task", "normalize_number", "require_math_verify", "require_reasoning_gym", "split", "task_size"]


def task_size(cfg: TaskConfig) -> int | None:
    """Problems the task has before its train/held-out split, without building them; None where that
    is only known once loaded (an HF dataset). A local JSONL file counts its non-empty lines;
    reasoning_gym counts the problems it generates (task.options.size), repeats included."""
    if cfg.name == "arith":
        return len(ARITH_OPERANDS) ** 2
    if cfg.name == "reasoning_gym":
        return gym_size(cfg)
    if cfg.name not in ("boxed", "math") or not cfg.source:
        return None
    return jsonl_size(cfg.source)


def load_task(cfg: TaskConfig) -> Task:
    from harness.registries import TASKS

    return TASKS.get(cfg.name)(cfg)
