"""What every converter shares: the result type and the one-line error text.

The architecture is read from the tensors in :mod:`ddscore_jax.converters.arch`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddscore_jax.model import ResNetConfig


@dataclass
class ImportedModel:
    """One imported checkpoint: its architecture and its own parameters as the canonical state
    dict (see the contract in :mod:`ddscore_jax.model`), checked against the config."""

    config: ResNetConfig
    state_dict: dict[str, np.ndarray]

    @property
    def arch(self) -> str:
        """The display name (``resnet50``, ``resnet18d``, ...)."""
        return self.config.name


def first_line(e: BaseException) -> str:
    """An exception's first line, capped: enough to say why, and the error stays one line."""
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__

