"""A flat mapping of a checkpoint's tensors (any layout, any prefix) -> :class:`ImportedModel`.

The one path every PyTorch-family format takes after its file is read: find the ResNet
(:mod:`.layouts`), rename it to the canonical names, convert only its tensors to float32 NumPy,
and read its architecture from them (:mod:`.arch`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ddscore_jax.converters import arch, layouts, leftovers
from ddscore_jax.converters._safety import check_float_dtypes
from ddscore_jax.model import ImportedModel


def import_state_dict(tensors: Mapping[str, Any], source: str,
                      hf_config: Mapping[str, Any] | None = None
                      ) -> tuple[ImportedModel, str, str | None]:
    """The ResNet in ``tensors`` (torch tensors or NumPy arrays), its key layout
    (``"torchvision"`` or ``"transformers"``) and the one warning line saying what was left out
    (heads, a second encoder: :mod:`.leftovers`), or None. ``hf_config``: the checkpoint's
    ``config.json``, if any, for the transformers options its tensors cannot show. InputError
    naming ``source``.
    """
    found = layouts.find_resnet(tensors, source)
    layouts.check_timm_config(hf_config, source)
    if found.layout == "transformers":
        layouts.check_transformers_config(
            hf_config if hf_config and hf_config.get("model_type") == "resnet" else None, source)
    sd = layouts.canonical(tensors, found, source)
    taken = (found.prefix, *found.aliases)
    if found.layout == "torchvision":
        # The projects whose convention picked an encoder all drop its fc: a projection head.
        sd, beside = leftovers.beside_backbone(sd, drop_fc=found.chose is not None)
    else:
        beside = []
        taken += (found.prefix.removesuffix("resnet.") + "classifier.",)
    check_float_dtypes(sd, source)
    config = arch.detect_config(sd, source)
    left_out = [found.prefix + k for k in beside] + leftovers.outside(tensors, taken)
    note = leftovers.warning(source, left_out, found.chose, found.dropped)
    return ImportedModel(config=config, state_dict={k: _float32(v) for k, v in sd.items()}), \
        found.layout, note


def _float32(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (possibly bfloat16, which NumPy lacks)
        value = value.detach().float().numpy()
    return np.ascontiguousarray(value, dtype=np.float32)
