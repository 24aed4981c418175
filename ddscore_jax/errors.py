"""The user's input or environment is at fault: the exception, the warning, and their one line."""

from __future__ import annotations

import errno
import os


class InputError(Exception):
    """Bad input: a file, folder or option the user supplied. The CLI prints it as one line, exit 2.

    Messages name the file first and then the problem, e.g. ``"model.pth: truncated checkpoint"``.
    """


class InputWarning(UserWarning):
    """Something in the input the run worked around (and says so): the CLI prints it as one line,
    ``warning: <message>``, and carries on."""


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
        while path and not os.path.lexists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
    return f"{readable(path)}: {what} ({remedy})"


_LOCATION_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                    errno.ENOTDIR}


def readable(name: str) -> str:
    """``name`` fit to print or write as UTF-8: bytes that did not decode (held by Python as
    surrogate escapes) become ``\\xNN``. Paths keep their raw form for opening files."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
