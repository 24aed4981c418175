"""Ctrl-C and SIGTERM: stop at a point where nothing is half-done, and say what was kept.

SIGTERM is turned into :class:`Terminated`, a ``KeyboardInterrupt``, so it runs exactly the cleanup
Ctrl-C runs (the extraction saves its finished rows; ``zoo.add`` rolls back). Steps that must not be
cut in half (an Orbax save, whose background threads would otherwise outlive the interpreter) run
under :func:`deferred`: a signal there is held until the step ends, then raised. What was kept is
attached to the exception as notes (``add_note``), which the CLI prints as its last line.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class Terminated(KeyboardInterrupt):
    """SIGTERM received."""


def _raise(signum: int, _frame=None) -> None:
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def install() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (Python's default just dies)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)


@contextmanager
def deferred(what: str) -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs and raise the first one when it ends; a second
    signal during the block is raised at once (the user insists)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, _frame) -> None:
        if pending:
            _raise(signum)
        pending.append(signum)
        log.warning("stopping once %s is done (interrupt again to stop at once)", what)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if pending:
        _raise(pending[0])


_kept: list[str | None] = [None]


def kept(what: str | None) -> None:
    """Record what an interrupt from now on would leave done (None: forget it). The notes on the
    exception, when it has any, say more precisely and win."""
    _kept[0] = what


def exit_line(e: KeyboardInterrupt) -> tuple[str, int]:
    """The CLI's last line and exit code for an interrupt: 130 for SIGINT, 143 for SIGTERM."""
    word, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
    notes = getattr(e, "__notes__", None) or ([_kept[0]] if _kept[0] else [])
    return (f"{word}: {'; '.join(notes)}" if notes else word), code
