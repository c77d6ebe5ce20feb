"""Progress on stderr: a rich progress bar on a terminal, plain lines otherwise; and the
console tables go to on stdout.

On a terminal the bar stays at the bottom with the current step as its description, and notes
scroll above it; into a file or a pipe every note and step is one plain line, so that a log of
a long run (the audit takes minutes) says how far it got.
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


def table_console(width: int = 400) -> Console:
    """Standard output for a table: the terminal's width, or ``width`` into a file or a pipe,
    so that a table written there is never cut."""
    out = Console()
    return out if out.is_terminal else Console(width=width)


class Ticker:
    """Counts ``total`` units of work, each ended by :meth:`advance`."""

    def __init__(self, err: Console, total: int, title: str) -> None:
        self.err = err
        self.title = title
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        if err.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]{task.fields[title]}[/bold]"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
                console=err,
                transient=True,
            )
            self.task = self.bar.add_task("", total=total, title=title)

    def __enter__(self) -> Ticker:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.stop()

    def note(self, markup: str) -> None:
        """A line of rich markup: above the bar, or plain."""
        self.err.print(markup, highlight=False)

    def step(self, text: str) -> None:
        """Name the unit now under way on the bar (plain text, not markup); without a bar,
        the notes already say it."""
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, description=escape(text))

    def advance(self, text: str | None = None) -> None:
        """One unit done; ``text`` names the next."""
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1)
            if text is not None:
                self.bar.update(self.task, description=escape(text))
        elif text is not None:
            self.err.print(escape(text), highlight=False)

    def grow(self, more: int) -> None:
        """``more`` units of work were found."""
        if self.bar is not None and self.task is not None:
            total = self.bar.tasks[0].total or 0
            self.bar.update(self.task, total=total + more)
