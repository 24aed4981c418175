"""What every converter shares: the one-line error text.

Every converter returns a :class:`ddscore_jax.model.ImportedModel`; the architecture is read from
the tensors in :mod:`ddscore_jax.converters.arch`."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """An exception's first line, capped: enough to say why, and the error stays one line."""
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__

