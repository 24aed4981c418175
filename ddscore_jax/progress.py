"""The progress callback that every long-running call of the library accepts, and its bars.

``progress(description, completed, total)`` is called as the work advances: a new
``description`` starts a new bar, the same one moves it. :class:`Bars` draws them with rich on
stderr; the CLI uses it, and the API's ``progress=True`` does (:func:`bars`). Nothing else of the
library prints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

Progress = Callable[[str, int, int], None]


class Bars:
    """The ``progress(description, completed, total)`` callback as rich progress bars."""

    def __init__(self, console: Console | None = None) -> None:
        # rich is imported here: importing this module stays free for a caller without bars.
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        console = console or Console(stderr=True)
        # markup=False: a description names models and paths, printed as given.
        self.bars = RichProgress(TextColumn("{task.description}", markup=False), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=console,
                                 # Piped stderr gets no bar snapshots: an error stays one line.
                                 transient=not console.is_terminal)
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> Bars:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.__exit__(*exc)

    def __call__(self, description: str, completed: int, total: int) -> None:
        if description not in self.tasks:
            self.tasks[description] = self.bars.add_task(description, total=total)
        self.bars.update(self.tasks[description], completed=completed, total=total)


@contextmanager
def bars(progress: Progress | bool | None) -> Iterator[Progress | None]:
    """The API's ``progress`` argument as a callback: ``True`` draws :class:`Bars` on stderr for
    the duration, ``False``/``None`` is none, a callable is used as it is."""
    if progress is True:
        with Bars() as drawn:
            yield drawn
    else:
        yield progress or None
