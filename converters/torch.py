"""PyTorch ``.pth``/``.pt`` checkpoints of torchvision ResNet18/34 -> the zoo's parameter tree.

torch is imported here and nowhere else on the JAX path (it is the ``torch`` extra).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ddscore_jax.converters._common import (
    ImportedModel,
    detect_arch,
    first_line,
    fold_bn,
    split_backbone,
)
from ddscore_jax.errors import InputError

# Where training scripts commonly nest the state_dict inside a checkpoint dict.
_NESTING_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes that wrappers add to every key: DataParallel/DDP and torch.compile.
_PREFIXES = ("module.", "_orig_mod.")
# torchvision's BatchNorm2d default (a state_dict does not record it), as the float32 value
# torch's float32 kernel adds and ONNX stores: .pth and unfolded-ONNX imports then agree bit
# for bit.
BN_EPS = float(np.float32(1e-5))


def load_pth(path: Path) -> ImportedModel:
    """Read a torchvision ResNet18/34 state_dict, never executing pickled code.

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
    """A torchvision ResNet state_dict as NumPy arrays -> :class:`ImportedModel`."""
    convs = [k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.ndim == 4]
    arch = detect_arch(convs, source)
    flat: dict[str, np.ndarray] = {}
    for conv in convs:
        bn = _bn_name(conv)
        try:
            stats = [sd[f"{bn}.{p}"] for p in ("weight", "bias", "running_mean", "running_var")]
        except KeyError as e:
            raise InputError(f"{source}: BatchNorm {e.args[0]} missing for {conv}") from None
        name = conv.removesuffix(".0")  # layerX.Y.downsample.0 -> layerX.Y.downsample
        flat[f"{name}.kernel"], flat[f"{name}.bias"] = fold_bn(
            sd[f"{conv}.weight"], sd.get(f"{conv}.bias"), *stats, BN_EPS
        )
    if "fc.weight" in sd and "fc.bias" in sd:
        flat["fc.kernel"] = np.ascontiguousarray(sd["fc.weight"].T, dtype=np.float32)
        flat["fc.bias"] = sd["fc.bias"].astype(np.float32)
    return split_backbone(arch, flat, source)


def _find_state_dict(obj, torch) -> dict | None:
    if not isinstance(obj, dict):
        return None
    if any(isinstance(v, torch.Tensor) and _strip(k) == "conv1.weight" for k, v in obj.items()):
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


def _bn_name(conv: str) -> str:
    if conv.endswith("downsample.0"):
        return conv[:-1] + "1"
    head, _, last = conv.rpartition(".")
    return (head + "." if head else "") + last.replace("conv", "bn")
