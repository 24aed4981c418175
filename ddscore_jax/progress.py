"""The progress callback that every long-running call of the library accepts.

``progress(description, completed, total)`` is called as the work advances: a new
``description`` starts a new bar, the same one moves it (the CLI draws them with
:class:`ddscore_jax.cli._common.Bars`). The library itself prints nothing.
"""

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
