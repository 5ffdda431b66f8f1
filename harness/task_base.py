"""What a task (registries.TASKS) is. The registry's targets are task classes, built as Task(cfg) from a
config.run.TaskConfig; the registry checks that the class declares every member below. Its own module,
importing nothing: harness.tasks imports the config, which imports the registries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from harness.tasks import Problem


@runtime_checkable
class Task(Protocol):
    train: list[Problem]
    """The training prompts."""

    eval: list[Problem]
    """The held-out prompts, disjoint from `train` and fixed whatever the run's seed."""

    def reward(self, problem: Problem, completion: str) -> float:
        """The reward of `completion` (decoded up to end-of-sequence) as an answer to `problem`."""
        ...

    def demonstration(self, problem: Problem) -> str:
        """A reference completion of `problem`: what the sft recipe imitates."""
        ...

    def formatted(self, completion: str) -> bool:
        """Whether `completion` holds its answer in the form `reward` reads (arith: digits alone; boxed, math:
        a closed \\boxed{...}; reasoning_gym: a closed <answer>...</answer>), right or wrong: what
        task.format_reward rewards."""
        ...
