"""Import outside ResNet checkpoints as the canonical state dict ``ddscore_jax.model`` takes.

Each converter is a "load from X" function: checkpoint in, :class:`ImportedModel` (architecture
read from the tensors + canonical state dict) out. A checkpoint is a file or a model folder (see
:mod:`.files`); torch and onnx are imported only inside the converter that needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ddscore_jax.converters._safety import check_parameters
from ddscore_jax.converters.files import (
    HUB_WEIGHTS,
    ONNX_SUFFIXES,
    SUFFIXES,
    checkpoint_stem,
    checkpoint_suffix,
    is_model_folder,
    model_folder_weights,
    read_config,
    read_tensors,
)
from ddscore_jax.errors import InputError
from ddscore_jax.model import ImportedModel


@dataclass
class Loaded:
    """An imported checkpoint and the format it came in, as ``zoo.json`` records it:
    ``safetensors``, ``pytorch``, ``lightning``, ``hf-transformers`` or ``onnx``."""

    model: ImportedModel
    source_format: str
    # One warning line: what was left out beside the ResNet, which encoder was taken; or None.
    note: str | None = None


def load_source(path: Path) -> Loaded:
    """Read one checkpoint file or model folder. InputError naming ``path`` for anything that is
    not a ResNet v1 this tool can represent (one line, saying why)."""
    path = Path(path)
    if path.is_dir():
        if not is_model_folder(path):
            raise InputError(f"{path}: a folder, but not a model folder (config.json with "
                             "model.safetensors or pytorch_model.bin)")
        weights = model_folder_weights(path)
    elif not path.is_file():
        raise InputError(f"{path}: no such file")
    else:
        weights = path
        if checkpoint_suffix(path) is None:
            raise InputError(f"{path}: not a checkpoint this tool reads "
                             f"(expected {', '.join(SUFFIXES)} or a model folder)")
    if checkpoint_suffix(weights) in ONNX_SUFFIXES:
        from ddscore_jax.converters.onnx import load_onnx

        return _checked(Loaded(load_onnx(weights), "onnx"), path)
    from ddscore_jax.converters.state_dict import import_state_dict

    read = read_tensors(weights)
    # A config.json speaks for the hub weights beside it, not for any file that shares a folder.
    hf_config = read_config(weights) if weights.name in HUB_WEIGHTS else None
    model, layout, note = import_state_dict(read.tensors, str(weights), hf_config)
    transformers = layout == "transformers" or (hf_config or {}).get("model_type") == "timm_wrapper"
    return _checked(Loaded(model, "hf-transformers" if transformers else read.container, note),
                    path)


def _checked(loaded: Loaded, path: Path) -> Loaded:
    # Every format ends here: a NaN, an infinity or a negative variance is refused by name.
    check_parameters(loaded.model.state_dict, str(path))
    return loaded


def load_checkpoint(path: Path) -> ImportedModel:
    """The ResNet in one checkpoint file or model folder (see :func:`load_source`)."""
    return load_source(path).model


__all__ = ["Loaded", "load_checkpoint", "load_source", "checkpoint_stem",
           "is_model_folder", "SUFFIXES"]
