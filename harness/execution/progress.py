"""Progress bars in a terminal, drawn from a sweep's events: an overall bar, one bar per running
run with its latest reward and eval (the first MAX_RUN_BARS; the overall bar counts the others),
and a line per finished run."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from harness.common.text import printable
from harness.execution.events import Ended, Event, Infeasible, Note, Planned, Rerun, Started, Stepped, Stopped, step_info

MAX_RUN_BARS = 16  # runs packed several to a GPU, or queued on Ray, would otherwise push the bars off the screen


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
        if isinstance(event, Planned):
            self.console.print(f"[bold]{printable(event.what)}[/]:{printable(str(event).removeprefix(event.what + ':'))}")
            if event.todo:
                self.bar.start()
                self.overall = self.bar.add_task("sweep", total=event.todo, info="")
        elif isinstance(event, Note):
            self.console.print(f"[yellow]{printable(event.text)}[/]" if event.warn else printable(event.text), highlight=False)
        elif isinstance(event, Started):
            job = event.job
            self.runs[job.cfg.run_id] = self.bar.add_task(f"  {printable(job.label)}", total=job.cfg.train.steps, info="",
                                                          visible=self._shown() < MAX_RUN_BARS)
            self._count_hidden()
        elif isinstance(event, Stepped):
            if event.job.cfg.run_id in self.runs:
                self.bar.update(self.runs[event.job.cfg.run_id], completed=event.step, info=step_info(event.reward, event.eval))
        else:  # a line with a coloured mark; a run that ended, stopped or was not launched leaves the bars
            if isinstance(event, (Ended, Stopped, Infeasible)):
                task = self.runs.pop(event.job.cfg.run_id, None)
                if task is not None:
                    self.bar.remove_task(task)
                    self._reveal()
                self._advance()
            mark, _, rest = str(event).partition(" ")
            colour = ("green" if isinstance(event, Ended) and event.ok
                      else "yellow" if isinstance(event, (Rerun, Stopped)) else "red")
            # printable: the text is data (labels, errors); unescaped, rich takes "[bead269e9bd2]" for a style and drops it
            self.console.print(f"[{colour}]{mark}[/] {printable(rest)}", highlight=False)

    def _shown(self) -> int:
        ids = set(self.runs.values())
        return sum(t.visible for t in self.bar.tasks if t.id in ids)

    def _reveal(self) -> None:
        """A bar for the earliest started runs without one, up to MAX_RUN_BARS."""
        tasks = {t.id: t for t in self.bar.tasks}
        room = MAX_RUN_BARS - sum(tasks[i].visible for i in self.runs.values())
        for task in [i for i in self.runs.values() if not tasks[i].visible][:max(0, room)]:
            self.bar.update(task, visible=True)
        self._count_hidden()

    def _count_hidden(self) -> None:
        hidden = len(self.runs) - self._shown()
        if self.overall is not None:
            self.bar.update(self.overall, info=f"+{hidden} started runs without a bar" if hidden else "")

    def _advance(self) -> None:
        if self.overall is not None:
            self.bar.advance(self.overall)
