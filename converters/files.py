"""Which file holds a model's weights, and its tensors as one flat mapping.

A *checkpoint* is a file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``, ``.pth.tar``, ``.ckpt``,
``.onnx``) or a *model folder*: a hub snapshot with ``config.json`` beside its weights, as
``hf download``, timm's ``save_for_hf``/``push_to_hub`` and transformers' ``save_pretrained``
write it (safetensors preferred over ``pytorch_model.bin``; sharded weights through their
``*.index.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddscore_jax.converters._common import first_line
from ddscore_jax.errors import InputError

# A model folder's weights, in order of preference: safetensors never runs a pickle.
HUB_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
HUB_CONFIG = "config.json"
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar", ".pt.tar", ".tar")
ONNX_SUFFIXES = (".onnx",)
# Longest first, so that "x.pth.tar" is a ".pth.tar" and not a ".tar".
SUFFIXES = tuple(sorted(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES + ONNX_SUFFIXES,
                        key=len, reverse=True))


def checkpoint_suffix(path: Path) -> str | None:
    """The checkpoint suffix ``path``'s name ends with (``".pth.tar"``, ``".ckpt"``...), or None."""
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s) and len(name) > len(s)), None)


def checkpoint_stem(path: Path) -> str:
    """``model_best.pth.tar`` -> ``model_best``; a model folder -> its name (for a hub cache
    snapshot ``models--org--name/snapshots/<hash>``: ``org--name``)."""
    if path.is_dir():
        if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
            return path.parent.parent.name[len("models--"):]
        return path.name
    suffix = checkpoint_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def is_model_folder(path: Path) -> bool:
    """True for a folder that is one model (``config.json`` and hub weights)."""
    return (path / HUB_CONFIG).is_file() and any((path / w).is_file() for w in HUB_WEIGHTS)


def model_folder_weights(folder: Path) -> Path:
    """The weights file a model folder's model is read from (safetensors first)."""
    for name in HUB_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"{folder}: folder has {HUB_CONFIG} but no weights ({', '.join(HUB_WEIGHTS)})")


def read_config(path: Path) -> dict[str, Any] | None:
    """The ``config.json`` beside a checkpoint (or in a model folder), or None."""
    config = (path if path.is_dir() else path.parent) / HUB_CONFIG
    if not config.is_file():
        return None
    try:
        doc = json.loads(config.read_text())
    except (ValueError, OSError) as e:
        raise InputError(f"{config}: unreadable config.json ({first_line(e)})") from None
    return doc if isinstance(doc, dict) else None


@dataclass
class Tensors:
    """A checkpoint file's tensors under dotted names (torch tensors or NumPy arrays) and the
    container they came in: ``"safetensors"``, ``"pytorch"`` or ``"lightning"``."""

    tensors: dict[str, Any]
    container: str


def read_tensors(path: Path) -> Tensors:
    """Every tensor of a safetensors or PyTorch file, or of a sharded hub checkpoint's shards
    (``*.index.json``). InputError naming ``path`` when it cannot be read."""
    name = path.name.lower()
    if name.endswith(".index.json"):
        return _read_sharded(path)
    if name.endswith(SAFETENSORS_SUFFIXES):
        return Tensors(read_safetensors(path), "safetensors")
    from ddscore_jax.converters.torch import read_torch

    tensors, container = read_torch(path)
    return Tensors(tensors, container)


def read_safetensors(path: Path) -> dict[str, Any]:
    """A ``.safetensors`` file's tensors as NumPy arrays: no pickle involved.

    bfloat16 tensors, which NumPy cannot hold, are read through torch when it is installed.
    """
    from safetensors import safe_open

    out: dict[str, Any] = {}
    try:
        with safe_open(path, framework="numpy") as f:
            keys = list(f.keys())
            for key in keys:
                try:
                    out[key] = f.get_tensor(key)
                except TypeError:  # bfloat16: "data type 'bfloat16' not understood"
                    out[key] = _bfloat16_tensor(path, key)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own and OS errors
        raise InputError(f"{path}: unreadable safetensors file, truncated or corrupt "
                         f"({first_line(e)})") from None
    return out


def _bfloat16_tensor(path: Path, key: str):
    from safetensors import safe_open

    try:
        import torch  # noqa: F401 - safetensors' "pt" framework needs it
    except ImportError:
        raise InputError(f"{path}: tensor '{key}' is bfloat16, which needs torch to read: "
                         "pip install 'ddscore-jax[torch]'") from None
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)


def _read_sharded(index: Path) -> Tensors:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise InputError(f"{index}: not a sharded-checkpoint index ({first_line(e)})") from None
    tensors: dict[str, Any] = {}
    container = "safetensors"
    for shard in shards:
        # A shard is a file beside the index, never a path elsewhere.
        if (not isinstance(shard, str) or Path(shard).name != shard
                or shard.lower().endswith(".index.json")):
            raise InputError(f"{index}: shard {shard!r} is not a file name beside the index")
        part = index.parent / shard
        if not part.is_file():
            raise InputError(f"{index}: shard {shard} is missing")
        read = read_tensors(part)
        tensors.update(read.tensors)
        container = read.container
    return Tensors(tensors, container)
