"""A flat mapping of a checkpoint's tensors (any layout, any prefix) -> :class:`ImportedModel`.

The one path every PyTorch-family format takes after its file is read: find the ResNet
(:mod:`.layouts`), rename it to the canonical names, convert only its tensors to float32 NumPy,
and read its architecture from them (:mod:`.arch`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ddscore_jax.converters import arch, layouts
from ddscore_jax.converters._safety import check_float_dtypes
from ddscore_jax.model import ImportedModel


def import_state_dict(tensors: Mapping[str, Any], source: str,
                      hf_config: Mapping[str, Any] | None = None) -> tuple[ImportedModel, str]:
    """The ResNet in ``tensors`` (torch tensors or NumPy arrays) and its key layout
    (``"torchvision"`` or ``"transformers"``). ``hf_config``: the checkpoint's ``config.json``,
    if any, for the transformers options its tensors cannot show. InputError naming ``source``.
    """
    found = layouts.find_resnet(tensors, source)
    layouts.check_timm_config(hf_config, source)
    if found.layout == "transformers":
        layouts.check_transformers_config(
            hf_config if hf_config and hf_config.get("model_type") == "resnet" else None, source)
    sd = layouts.canonical(tensors, found, source)
    check_float_dtypes(sd, source)
    config = arch.detect_config(sd, source)
    return ImportedModel(config=config, state_dict={k: _float32(v) for k, v in sd.items()}), \
        found.layout


def _float32(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (possibly bfloat16, which NumPy lacks)
        value = value.detach().float().numpy()
    return np.ascontiguousarray(value, dtype=np.float32)
