"""Outputs appear whole or not at all (docs/interface.md): write beside the target, flush it
to disk, then rename over it.

Also the fault-injection hook the crash tests use: :func:`fault_point` marks a step of a multi-file
update; with ``DDSCORE_JAX_FAULT=<step>`` in the environment the process signals itself there
(``SIGKILL`` by default), so a test can stop a real command at any step. Without the variable it
does nothing.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ddscore_jax.errors import InputError, readable


def _read_umask() -> int:
    """The process umask, without changing it where the kernel reports it (Linux >= 4.7)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere the only way is to set it and put it back; this runs once, at import, which
    # Python serialises, so no thread sees the momentary 0.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or creation in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename itself is still atomic
    finally:
        os.close(fd)


def refused(path: str | os.PathLike, e: OSError) -> InputError | None:
    """The user's line for creating ``path`` (a file or folder) when the system said ENOENT: a
    folder that exists and still refuses new entries (``/proc``, ``/sys``, some FUSE mounts), or
    one that does not exist. None for other errors (:func:`ddscore_jax.errors.
    environment_message` explains those)."""
    if e.errno != errno.ENOENT:
        return None
    path = Path(path)
    existing = path.parent
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return None
    where = readable(str(path))
    if existing == path.parent or path.parent.is_dir():
        return InputError(f"{where}: cannot be created: folder {readable(str(existing))} refuses "
                          "new files (choose another location)")
    return InputError(f"{where}: cannot be created: folder {readable(str(path.parent))} does "
                      "not exist")


def make_folder(path: str | os.PathLike) -> Path:
    """``mkdir -p path``; a location that refuses new folders is the user's InputError (other
    OSErrors go on to the CLI's one-line environment report)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileNotFoundError as e:
        raise (refused(path, e) or e) from None
    return path


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, before any work, when ``path``'s folder cannot take a new file: create a
    temporary there and remove it. InputError or the OSError, naming ``path``."""
    fd, tmp = _temporary(Path(path))
    os.close(fd)
    os.unlink(tmp)


def _temporary(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path`` (``mkstemp``'s pair). InputError or the OSError,
    naming ``path``'s folder, when the folder refuses it (read-only, full, forbidden)."""
    try:
        return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        err = refused(path, e)
        if err is not None:
            raise err from None
        e.filename = str(path.parent)
        raise


@contextmanager
def atomic_path(path: str | os.PathLike, *, step: str = "file") -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; when the block succeeds it is flushed to disk
    and replaces ``path``, when it fails it is removed. The file gets the permissions a plain
    ``open`` would give it (``mkstemp`` would leave it readable by its owner only).

    ``step`` names the fault points ``<step>:written`` (temporary complete, not yet renamed) and
    ``<step>:replaced`` (renamed, folder not yet synced).
    """
    path = Path(path)
    fd, tmp = _temporary(path)
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)
        fault_point(f"{step}:written")
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename in (None, tmp):
            e.filename = str(path)  # name the file the user asked for, not our temporary
        raise
    fault_point(f"{step}:replaced")
    fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, doc: object, *, step: str = "json") -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    with atomic_path(path, step=step) as tmp, open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


_FAULT = re.compile(r"^(?P<step>[\w.:-]+?)(?:@(?P<nth>\d+))?(?:=(?P<sig>[A-Z]+))?$")
_fault_counts: Counter[str] = Counter()
_fault_lock = threading.Lock()


def fault_point(step: str) -> None:
    """Test hook: signal this process at ``step`` when ``DDSCORE_JAX_FAULT`` names it.

    ``DDSCORE_JAX_FAULT=<step>[@<n>][=<SIGNAL>][,...]``: at the n-th time (default: first) the
    step is reached, send the signal (default KILL; TERM and INT test the graceful paths). Several
    comma-separated faults chain, e.g. a TERM whose cleanup is then killed halfway.
    """
    spec = os.environ.get("DDSCORE_JAX_FAULT")
    if not spec:
        return
    for part in spec.split(","):
        m = _FAULT.match(part.strip())
        if not m or m["step"] != step:
            continue
        with _fault_lock:
            _fault_counts[step] += 1
            count = _fault_counts[step]
        if count == int(m["nth"] or 1):
            os.kill(os.getpid(), getattr(signal, f"SIG{m['sig'] or 'KILL'}"))
        return
