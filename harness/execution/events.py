"""What a sweep tells its caller while it runs: typed events, one per thing that happened.

Executors and the API emit them to an `on_event` callback; the CLI draws progress bars from them
(harness.execution.progress), a notebook may `print` them (each reads as one line), a dashboard
may send them on. Nothing here imports torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from harness.common.text import number

if TYPE_CHECKING:
    from harness.execution.jobs import Job


@dataclass(frozen=True)
class Planned:
    """Before anything runs: how many runs the sweep has, and how many of them must run now."""

    what: str
    total: int
    todo: int

    def __str__(self) -> str:
        return f"{self.what}: {self.total} runs, {self.total - self.todo} already finished, {self.todo} to run"


@dataclass(frozen=True)
class Rerun:
    """A finished or damaged run that runs again, and why (README, "Re-running a sweep")."""

    job: Job
    why: str

    def __str__(self) -> str:
        return f"↻ {self.job.label} [{self.job.cfg.run_id}]: {self.why}"


@dataclass(frozen=True)
class Note:
    """Anything else worth a line: runs kept as they ended, slots in use, runs being stopped (`warn`)."""

    text: str
    warn: bool = False

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Infeasible:
    """A run the memory-fit pre-check did not launch; its summary.json says why."""

    job: Job
    error: str

    def __str__(self) -> str:
        return f"✗ {self.job.label} [{self.job.cfg.run_id}] infeasible: {self.error}"


@dataclass(frozen=True)
class Started:
    job: Job

    def __str__(self) -> str:
        return f"started {self.job.label} [{self.job.cfg.run_id}]"


@dataclass(frozen=True)
class Stepped:
    """A run's latest logged step (executors that run jobs elsewhere report it as they see it)."""

    job: Job
    step: int
    reward: float | None = None
    eval: float | None = None

    def __str__(self) -> str:
        return f"{self.job.label} step {self.step}/{self.job.cfg.train.steps}" + (
            f"  {step_info(self.reward, self.eval)}" if self.reward is not None else "")


@dataclass(frozen=True)
class Ended:
    """A run finished: its summary.json (status ok, failed, diverged, killed, ...)."""

    job: Job
    summary: dict

    @property
    def ok(self) -> bool:
        return self.summary["status"] == "ok"

    def __str__(self) -> str:
        s, where = self.summary, f"{self.job.label} [{self.job.cfg.run_id}]"
        if not self.ok:
            return f"✗ {where} {s['status']}: {s['error']}"
        start, end = number(s.get("eval_start"), none="n/a"), number(s.get("eval_end"), none="n/a")
        return f"✓ {where} eval {start} → {end} in {s['wall_s']:.0f} s"


@dataclass(frozen=True)
class Stopped:
    """A run stopped from outside before it finished (no summary): the next sweep resumes it."""

    job: Job

    def __str__(self) -> str:
        return f"■ {self.job.label} [{self.job.cfg.run_id}] stopped before it finished; the next sweep resumes it"


Event = Planned | Rerun | Note | Infeasible | Started | Stepped | Ended | Stopped
OnEvent = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The default callback: a sweep driven from Python is silent unless asked (`on_event=print`)."""


def step_info(reward: float | None, eval: float | None) -> str:
    return ("" if reward is None else f"reward {reward:.2f}") + (f"  eval {eval:.3f}" if eval is not None else "")
