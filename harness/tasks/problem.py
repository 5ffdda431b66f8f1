"""A task's problems and their held-out split, shared by every task module."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SPLIT_SEED = 1234  # fixed: the held-out set must not move with the run's seed


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str  # what the reward compares with
    solution: str = ""  # a worked reference completion, where the source has one (the sft recipe imitates it)
    # the source's own record of the problem, for a verifier that reads more than the answer (reasoning-gym's
    # dataset entry, metadata and all); not part of the problem's identity
    entry: dict | None = field(default=None, compare=False, repr=False)


def split(problems: list[Problem], eval_size: int) -> tuple[list[Problem], list[Problem]]:
    """(train, held out): a shuffle by SPLIT_SEED, its first `eval_size` problems held out."""
    if eval_size >= len(problems):
        raise ValueError(f"task.eval_size={eval_size} leaves no training prompts ({len(problems)} problems)")
    shuffled = problems[:]
    random.Random(SPLIT_SEED).shuffle(shuffled)
    return shuffled[eval_size:], shuffled[:eval_size]
