"""PyTorch ``.pth``/``.pt`` checkpoints of torchvision/timm-layout ResNets -> the canonical dict.

torch is imported here and nowhere else on the JAX path (it is the ``torch`` extra).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ddscore_jax.converters._common import ImportedModel, first_line, imported
from ddscore_jax.errors import InputError

# Where training scripts commonly nest the state_dict inside a checkpoint dict.
_NESTING_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes that wrappers add to every key: DataParallel/DDP and torch.compile.
_PREFIXES = ("module.", "_orig_mod.")
# Keys of the stem convolution: torchvision's, or timm's deep stem (ResNet-D).
_STEM_KEYS = ("conv1.weight", "conv1.0.weight")


def load_pth(path: Path) -> ImportedModel:
    """Read a torchvision/timm-layout ResNet state_dict, never executing pickled code.

    Accepts a plain state_dict, one with ``module.`` prefixes, or one nested under ``state_dict``,
    ``model`` or ``model_state_dict``; any classifier size. Raises InputError naming ``path``.
    """
    try:
        import torch
    except ImportError:
        raise InputError(f"{path}: importing PyTorch checkpoints needs torch: "
                         "pip install 'ddscore-jax[torch]'") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise InputError(f"{path}: refused: the pickle asks to run code or build objects other "
                             "than tensors (loaded with weights_only=True)") from None
        raise InputError(f"{path}: unreadable PyTorch checkpoint ({first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - torch reports truncation as RuntimeError, EOFError, ...
        raise InputError(f"{path}: unreadable PyTorch checkpoint, truncated or corrupt "
                         f"({first_line(e)})") from None

    state_dict = _find_state_dict(obj, torch)
    if state_dict is None:
        raise InputError(f"{path}: not a torchvision ResNet: no 'conv1.weight' tensor at the top "
                         f"level or under {', '.join(_NESTING_KEYS)}")
    tensors = {_strip(k): v.detach().float().numpy() for k, v in state_dict.items()
               if isinstance(v, torch.Tensor) and v.is_floating_point()}
    return from_state_dict(tensors, str(path))


def from_state_dict(sd: dict[str, np.ndarray], source: str) -> ImportedModel:
    """A torchvision/timm ResNet state_dict as NumPy arrays -> :class:`ImportedModel` (the
    checkpoint's own parameters under their own names; BatchNorm is folded later, at inference)."""
    return imported({k: v for k, v in sd.items() if not k.endswith(".num_batches_tracked")},
                    source)


def _find_state_dict(obj, torch) -> dict | None:
    if not isinstance(obj, dict):
        return None
    if any(isinstance(v, torch.Tensor) and _strip(k) in _STEM_KEYS for k, v in obj.items()):
        return obj
    for key in _NESTING_KEYS:
        found = _find_state_dict(obj.get(key), torch)
        if found is not None:
            return found
    return None


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key
