"""The user's input or environment is at fault: the exception, the warning, and their one line."""

from __future__ import annotations

import errno
import os
import re


class InputError(Exception):
    """Bad input: a file, folder or option the user supplied. The CLI prints it as one line, exit 2.

    Messages name the file first and then the problem, e.g. ``"model.pth: truncated checkpoint"``.
    """


# errno -> what it means for the user and what to do about it.
_ENVIRONMENT = {
    errno.ENOSPC: ("no space left on the device", "free some space or choose another location"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another location"),
    errno.EFBIG: ("file too large for this file system or limit",
                  "free some space or choose another location"),
    errno.EROFS: ("read-only file system", "choose a writable location"),
    errno.EACCES: ("permission denied", "check its permissions or choose another location"),
    errno.EPERM: ("operation not permitted",
                  "check its permissions or choose another location"),
    errno.ENOTDIR: ("a file is in the way where a folder is needed",
                    "give a folder path, or move the file"),
    errno.EISDIR: ("is a folder, a file is needed", "give a file path"),
    errno.EEXIST: ("exists and is not a folder", "give a folder path, or move the file"),
    errno.ENOMEM: ("out of memory", "use a smaller --batch-size or --image-size"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) or use fewer --workers"),
}


def environment_message(e: OSError) -> str | None:
    """One line for an OSError the user's environment caused (a full or read-only disk, a
    permission, a file where a folder belongs...): the path, what happened, the remedy. None for
    an errno that is not listed: that one is a bug, reported as such."""
    if e.errno not in _ENVIRONMENT:
        return None
    what, remedy = _ENVIRONMENT[e.errno]
    path = e.filename if e.filename is not None else e.filename2
    if path is None:
        return f"{what} ({remedy})"
    path = os.fsdecode(path)
    if e.errno in _LOCATION_ERRORS:
        # A temporary we (or Orbax) were about to create means nothing to the user: name the
        # nearest path that exists, the folder that is full, read-only or forbidden, or the
        # file in the way of a folder.
        parts = path.split(os.sep)
        temporary = [i for i, part in enumerate(parts) if part.startswith(".") and "tmp" in part]
        if temporary:
            path = os.sep.join(parts[: temporary[0]]) or os.sep
        while path and not os.path.lexists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
    return f"{readable(path)}: {what} ({remedy})"


_LOCATION_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                    errno.EPERM, errno.ENOTDIR}


def readable(name: str) -> str:
    """``name`` fit to print or write as UTF-8: bytes that did not decode (held by Python as
    surrogate escapes) become ``\\xNN``. Paths keep their raw form for opening files."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_QUOTED_PATH = re.compile(r'local file "([^"]+)"|"(/[^"]+)"')


def os_error_in_text(e: Exception) -> OSError | None:
    """The OSError behind a library error that carries it only as text: tensorstore, Orbax's
    writer, raises ``ValueError('RESOURCE_EXHAUSTED: ... local file "PATH" ... No space left on
    device')``. None when the text names no error of ours to explain."""
    text = str(e)
    for code in _ENVIRONMENT:
        if os.strerror(code) in text:
            m = _QUOTED_PATH.search(text)
            return OSError(code, os.strerror(code), (m.group(1) or m.group(2)) if m else None)
    return None
