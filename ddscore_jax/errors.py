"""The one exception type that means "the user gave us something we cannot use"."""


class InputError(Exception):
    """Bad input: a file, folder or option the user supplied. The CLI prints it as one line, exit 2.

    Messages name the file first and then the problem, e.g. ``"model.pth: truncated checkpoint"``.
    """


class InputWarning(UserWarning):
    """Something in the input the run worked around (and says so): the CLI prints it as one line,
    ``warning: <message>``, and carries on."""
