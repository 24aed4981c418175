"""One writer at a time: advisory locks on a zoo and on each feature-cache entry.

A lock is ``flock`` on a small file that is created once and never removed (removing a lock file
races with a process already waiting on it). Only writers lock; readers never wait, because every
write is an atomic rename and the zoo's old checkpoints are removed only after ``zoo.json`` stops
naming them. The kernel drops a lock when its holder dies, ``kill -9`` included, so whoever holds a
lock knows that any temporary file of the same zoo or entry is a dead writer's leftover: that is
how the start-up sweeps (``zoo._sweep``, ``cache.sweep``) tell stale temporaries from live ones,
without guessing from their age.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ddscore_jax.errors import InputError

log = logging.getLogger(__name__)


def _open(lock_file: Path) -> int:
    try:
        return os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise InputError(f"{lock_file.parent}: cannot write here ({e.strerror})") from None


@contextmanager
def exclusive(lock_file: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the write lock ``lock_file`` for the block; wait (saying so on stderr) while another
    process holds it. ``what`` names the thing locked in that message."""
    lock_file = Path(lock_file)
    fd = _open(lock_file)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another ddscore-jax process is writing it; waiting for it", what)
            fcntl.flock(fd, fcntl.LOCK_EX)  # Ctrl-C still interrupts the wait
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


@contextmanager
def if_free(lock_file: str | os.PathLike) -> Iterator[bool]:
    """Take the write lock ``lock_file`` only if nobody holds it; yields whether it was taken."""
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError:
        yield False  # an unwritable folder: nothing of ours to clean there
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
