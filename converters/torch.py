"""PyTorch pickle checkpoints (``.pth``, ``.pt``, ``pytorch_model.bin``, ``.pth.tar``, Lightning
``.ckpt``) -> their tensors as one flat mapping, never executing pickled code.

Every file is loaded with ``torch.load(weights_only=True)``: torch's restricted unpickler builds
tensors, dicts, lists and plain values and refuses any other object (``argparse.Namespace``
aside: an attribute holder that training scripts save as ``args``, built without running code).
Two kinds of file it would refuse with a misleading message are recognised first, from their
zip entries, and refused with what they are and how to re-save them: TorchScript archives
(``torch.jit.save``: code and constants inside) and whole pickled modules (``torch.save(model)``).

torch is imported here and nowhere else on the JAX path (it is the ``torch`` extra).
"""

from __future__ import annotations

import argparse
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any

from ddscore_jax.converters._common import first_line
from ddscore_jax.converters._safety import check_zip_sizes
from ddscore_jax.errors import InputError

# How deep nested checkpoint dicts are searched for tensors (``{"state_dict": {...}}`` is 2).
_MAX_DEPTH = 8
_RESAVE = "re-save its weights with torch.save(model.state_dict(), PATH)"


def read_torch(path: Path) -> tuple[dict[str, Any], str]:
    """All tensors of a PyTorch checkpoint under dotted names, and its container format.

    Nested dicts and lists are flattened (``{"state_dict": {"net.conv1.weight": t}}`` becomes
    ``"state_dict.net.conv1.weight"``); values stay torch tensors. The format is ``"lightning"``
    for a Lightning checkpoint and ``"pytorch"`` otherwise. InputError naming ``path`` for a file
    that is not a plain pickle of tensors.
    """
    try:
        import torch
    except ImportError:
        raise InputError(f"{path}: importing PyTorch checkpoints needs torch: "
                         "pip install 'ddscore-jax[torch]'") from None
    _refuse_code_archives(path)
    check_zip_sizes(path)
    try:
        # argparse.Namespace, which DINO (and other training scripts) save as 'args' beside the
        # weights, is a plain attribute holder: built without running code, as a dict would be.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True,
                             mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise InputError(f"{path}: {_unsafe_reason(path, torch)}") from None
        raise InputError(f"{path}: unreadable PyTorch checkpoint ({first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - torch reports truncation as RuntimeError, EOFError, ...
        raise InputError(f"{path}: unreadable PyTorch checkpoint, truncated or corrupt "
                         f"({first_line(e)})") from None
    flat: dict[str, Any] = {}
    _flatten(obj, "", flat, torch, 0)
    lightning = isinstance(obj, dict) and any(str(k).endswith("lightning_version") for k in obj)
    return flat, "lightning" if lightning else "pytorch"


def _flatten(obj: Any, prefix: str, out: dict[str, Any], torch, depth: int) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    elif depth < _MAX_DEPTH and isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out, torch, depth + 1)
    elif depth < _MAX_DEPTH and isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}{i}.", out, torch, depth + 1)


def _refuse_code_archives(path: Path) -> None:
    """InputError for a TorchScript archive, told apart by its ``code/`` and ``constants.pkl``
    entries (torch.load would only say that weights_only cannot read it)."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return  # torch.load reports the damage with its own words
    parts = [n.split("/", 1)[-1] for n in names]
    if "constants.pkl" in parts or any(p.startswith("code/") for p in parts):
        raise InputError(f"{path}: a TorchScript archive (torch.jit.save), which holds code that "
                         f"this tool does not run; {_RESAVE}")


def _unsafe_reason(path: Path, torch) -> str:
    """Why ``weights_only`` refused the file, from the globals its pickle names (read without
    unpickling): a whole pickled ``nn.Module``, or some other object."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - a legacy (non-zip) file: read its pickle's opcodes
        names = _pickle_globals(path)
    if any(n.startswith("torch.nn.modules.") or n.endswith(".ResNet") for n in names):
        cls = next((n for n in names if not n.startswith("torch.")), names[0])
        return (f"refused: a whole pickled model ({cls}, torch.save(model)), which only loads by "
                f"running its code; {_RESAVE}")
    shown = ", ".join(sorted(names)[:3]) or "unknown objects"
    return ("refused: the pickle asks to run code or build objects other than tensors "
            f"({shown}); loaded with weights_only=True")


def _pickle_globals(path: Path) -> list[str]:
    try:
        with open(path, "rb") as f:
            names = []
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
            return names
    except Exception:  # noqa: BLE001 - the opcodes are only for the message
        return []
