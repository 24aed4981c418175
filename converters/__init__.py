"""Import outside ResNet checkpoints into the zoo's one parameter tree (see ``ddscore_jax.model``).

Each converter is a "load from X" function: file in, :class:`ImportedModel` out. torch and onnx
are imported only inside the converter that needs them.
"""

from __future__ import annotations

from pathlib import Path

from ddscore_jax.converters._common import ImportedModel
from ddscore_jax.errors import InputError

TORCH_SUFFIXES = (".pth", ".pt")
ONNX_SUFFIXES = (".onnx",)
SUFFIXES = TORCH_SUFFIXES + ONNX_SUFFIXES


def source_format(path: Path) -> str:
    """``"pytorch"`` or ``"onnx"`` from the file's suffix; InputError for anything else."""
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return "pytorch"
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    raise InputError(f"{path}: not a checkpoint this tool reads (expected {', '.join(SUFFIXES)})")


def load_checkpoint(path: Path) -> ImportedModel:
    """Read a ``.pth``/``.pt``/``.onnx`` ResNet18/34 checkpoint into the zoo's parameter tree."""
    fmt = source_format(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if fmt == "pytorch":
        from ddscore_jax.converters.torch import load_pth

        return load_pth(path)
    from ddscore_jax.converters.onnx import load_onnx

    return load_onnx(path)


__all__ = ["ImportedModel", "load_checkpoint", "source_format", "SUFFIXES"]
