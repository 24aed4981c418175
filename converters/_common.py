"""What every converter shares: the result type and BatchNorm folding."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ddscore_jax import model
from ddscore_jax.errors import InputError


@dataclass
class ImportedModel:
    """One imported checkpoint.

    ``params``: the backbone (stem to conv4_x) as a flat tree, checked against the model's init.
    ``head``: ``layer4.*`` and ``fc.*`` in the same folded, HWIO form when the source has them
    (fine-tuning and source-classifier metrics need them; the features never do).
    """

    arch: str
    params: dict[str, np.ndarray]
    head: dict[str, np.ndarray] = field(default_factory=dict)


def fold_bn(
    weight_oihw: np.ndarray,
    conv_bias: np.ndarray | None,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold an inference BatchNorm into the conv before it; return (HWIO kernel, bias), float32.

    Done in float64 so that folding adds no error beyond the final rounding to float32.
    """
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    bias = np.zeros_like(scale) if conv_bias is None else np.asarray(conv_bias, np.float64)
    shift = np.asarray(beta, np.float64) + (bias - np.asarray(mean, np.float64)) * scale
    kernel = np.asarray(weight_oihw, np.float64) * scale[:, None, None, None]
    return to_hwio(kernel), shift.astype(np.float32)


def to_hwio(weight_oihw: np.ndarray) -> np.ndarray:
    """torch/ONNX OIHW conv weight -> Flax HWIO (an explicit transpose, never a bare ``.T``)."""
    return np.ascontiguousarray(np.asarray(weight_oihw).transpose(2, 3, 1, 0), dtype=np.float32)


_BLOCK = re.compile(r"^(layer[1-4])\.(\d+)\.conv1$")


def detect_arch(conv_names: list[str], source: str) -> str:
    """Architecture from the module names of a torchvision-layout ResNet's convolutions.

    ``conv_names`` are names such as ``"layer2.0.conv1"``; a Bottleneck ResNet (conv3), a plain conv
    stack or an unknown depth is refused with an InputError naming ``source``.
    """
    if "conv1" not in conv_names:
        raise InputError(f"{source}: not a torchvision ResNet (no stem convolution 'conv1')")
    if any(name.endswith(".conv3") for name in conv_names):
        raise InputError(f"{source}: Bottleneck ResNets (resnet50 and up) are not supported; "
                         "only ResNet18/34")
    depth = [0, 0, 0, 0]
    for name in conv_names:
        m = _BLOCK.match(name)
        if m:
            stage = int(m.group(1)[-1]) - 1
            depth[stage] = max(depth[stage], int(m.group(2)) + 1)
    for arch, blocks in model.ARCHS.items():
        if tuple(depth) == blocks:
            return arch
    if depth[2] == 0:
        raise InputError(f"{source}: not a torchvision ResNet (no conv4_x blocks 'layer3.*')")
    raise InputError(f"{source}: ResNet with blocks per stage {tuple(depth)} is not supported; "
                     f"supported: " + ", ".join(f"{a} {b}" for a, b in model.ARCHS.items()))


def split_backbone(arch: str, flat: dict[str, np.ndarray], source: str) -> ImportedModel:
    """Split a full flat tree into backbone and head, and check the backbone against the model."""
    params = {k: v for k, v in flat.items() if k.split(".")[0] in ("conv1", *model.BACKBONE_STAGES)}
    head = {k: v for k, v in flat.items() if k not in params}
    try:
        model.flat_to_state(params, arch)
    except ValueError as e:
        raise InputError(f"{source}: {e}") from None
    return ImportedModel(arch=arch, params=params, head=head)


def first_line(e: BaseException) -> str:
    """An exception's first line, capped: enough to say why, and the error stays one line."""
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
