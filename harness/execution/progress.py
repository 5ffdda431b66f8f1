"""Progress bars in a terminal, drawn from a sweep's events: an overall bar, one bar per running
run with its latest reward and eval, and a line per finished run."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from harness.common.text import number, printable
from harness.execution.events import Ended, Event, Infeasible, Note, Planned, Rerun, Started, Stepped, step_info


def progress_bar(console: Console) -> Progress:
    """An overall bar plus one per run, each with its latest reward and eval (tasks take an `info` field)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn())
    return Progress(*columns, console=console, transient=False)


class RichProgress:
    """An `on_event` callback for a terminal; a context manager, as the bars it draws are live.
    Everything a run or a model wrote is escaped (printable): it is data, not markup."""

    def __init__(self, console: Console):
        self.console = console
        self.bar = progress_bar(console)
        self.overall: TaskID | None = None
        self.runs: dict[str, TaskID] = {}

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.overall is not None:  # started by a sweep with runs to run; stopping one never started prints a blank line
            self.bar.stop()

    def __call__(self, event: Event) -> None:
        where = lambda job: printable(f"{job.label} [{job.cfg.run_id}]")  # noqa: E731  (rich takes "[bead269e9bd2]" for a style)
        if isinstance(event, Planned):
            self.console.print(f"[bold]{printable(event.what)}[/]: {event.total} runs, "
                               f"{event.total - event.todo} already finished, {event.todo} to run")
            if event.todo:
                self.bar.start()
                self.overall = self.bar.add_task("sweep", total=event.todo, info="")
        elif isinstance(event, Rerun):
            self.console.print(f"[yellow]↻[/] {where(event.job)}: {printable(event.why)}")
        elif isinstance(event, Note):
            self.console.print(printable(event.text), highlight=False)
        elif isinstance(event, Infeasible):
            self.console.print(f"[red]✗[/] {where(event.job)} infeasible: {printable(event.error)}")
            self._advance()
        elif isinstance(event, Started):
            self.runs[event.job.cfg.run_id] = self.bar.add_task(f"  {printable(event.job.label)}",
                                                                total=event.job.cfg.train.steps, info="")
        elif isinstance(event, Stepped) and event.job.cfg.run_id in self.runs:
            self.bar.update(self.runs[event.job.cfg.run_id], completed=event.step, info=step_info(event.reward, event.eval))
        elif isinstance(event, Ended):
            task = self.runs.pop(event.job.cfg.run_id, None)
            if task is not None:
                self.bar.remove_task(task)
            self._advance()
            s = event.summary
            if event.ok:
                start, end = number(s.get("eval_start"), none="n/a"), number(s.get("eval_end"), none="n/a")
                self.console.print(f"[green]✓[/] {where(event.job)} eval {start} → {end} in {s['wall_s']:.0f} s")
            else:
                self.console.print(f"[red]✗[/] {where(event.job)} {printable(s['status'])}: {printable(s['error'])}")

    def _advance(self) -> None:
        if self.overall is not None:
            self.bar.advance(self.overall)
