"""Running runs: jobs and the events they emit, a run's lifecycle, the local/Ray/sequential executors,
the worker process, memory fit. `Executor` is the type every executor in registries.EXECUTORS has."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from harness.execution.events import OnEvent
    from harness.execution.jobs import ExecutorSettings, Job


@runtime_checkable
class Executor(Protocol):
    """An executor (registries.EXECUTORS): runs every job, reporting each one's start, steps and end through
    `events`; returns when all have ended."""

    def __call__(self, jobs: list[Job], settings: ExecutorSettings, events: OnEvent) -> None: ...
