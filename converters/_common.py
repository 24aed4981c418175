"""What every converter shares: the result type and reading the architecture from the tensors."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ddscore_jax import model
from ddscore_jax.errors import InputError
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


_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.conv1\.weight$")


def infer_config(sd: dict[str, np.ndarray], source: str) -> ResNetConfig:
    """A ResNet v1's config from its canonical tensors alone (never from a name).

    Block type from ``conv3``, depths from the block indices, groups and width from the first
    Bottleneck's 3x3 kernel, ResNet-D stem and shortcut from their key layouts, the classifier
    from ``fc.weight``, folded or not from the presence of ``bn1``. InputError names ``source``.
    """
    if "conv1.weight" not in sd and "conv1.0.weight" not in sd:
        raise InputError(f"{source}: not a ResNet (no stem convolution 'conv1')")
    depths = [0, 0, 0, 0]
    for key in sd:
        m = _BLOCK.match(key)
        if m:
            stage = int(m.group(1)) - 1
            depths[stage] = max(depths[stage], int(m.group(2)) + 1)
    if not all(depths[:3]):
        raise InputError(f"{source}: not a ResNet: no blocks in "
                         f"{', '.join(f'layer{i + 1}' for i in range(3) if not depths[i])}")
    bottleneck = "layer1.0.conv3.weight" in sd
    groups, base_width = 1, 64
    if bottleneck:
        # conv2 of layer1.0: (width, width / groups, 3, 3) with width = base_width * groups.
        width, per_group = np.shape(sd["layer1.0.conv2.weight"])[:2]
        groups = int(width // per_group)
        base_width = int(per_group)
    deep = "conv1.0.weight" in sd
    try:
        return ResNetConfig(
            block="bottleneck" if bottleneck else "basic", depths=tuple(depths),
            groups=groups, base_width=base_width, deep_stem=deep,
            stem_width=int(np.shape(sd["conv1.0.weight"])[0]) if deep else 64,
            avg_down=any(k.endswith("downsample.1.weight") and np.ndim(v) == 4
                         for k, v in sd.items()),
            num_classes=int(np.shape(sd["fc.weight"])[0]) if "fc.weight" in sd else 0,
            batchnorm="bn1.weight" in sd)
    except ValueError as e:
        raise InputError(f"{source}: not a supported ResNet ({e})") from None


def imported(sd: dict[str, np.ndarray], source: str) -> ImportedModel:
    """Canonical tensors -> :class:`ImportedModel`, the config read from them and every key and
    shape checked against it (InputError listing what does not fit)."""
    config = infer_config(sd, source)
    sd = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}
    try:
        model.check_state_dict(sd, config)
    except ValueError as e:
        raise InputError(f"{source}: {e}") from None
    return ImportedModel(config, sd)


def first_line(e: BaseException) -> str:
    """An exception's first line, capped: enough to say why, and the error stays one line."""
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


# --- The ONNX converter's folded HWIO tree, until converters/onnx.py emits canonical names -------
# onnx.py still builds ``{"layer1.0.conv1.kernel": HWIO, ".bias": ...}`` with BatchNorm folded;
# these keep it working by turning that tree into the canonical dict of a folded source.

_ARCHS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
_CONV_BLOCK = re.compile(r"^(layer[1-4])\.(\d+)\.conv1$")


def fold_bn(weight_oihw, conv_bias, gamma, beta, mean, var, eps) -> tuple[np.ndarray, np.ndarray]:
    """:func:`ddscore_jax.model.fold_bn`, returning the kernel HWIO (onnx.py's tree)."""
    weight, bias = model.fold_bn(weight_oihw, conv_bias, gamma, beta, mean, var, eps)
    return to_hwio(weight), bias


def to_hwio(weight_oihw: np.ndarray) -> np.ndarray:
    """torch/ONNX OIHW conv weight -> Flax HWIO (an explicit transpose, never a bare ``.T``)."""
    return np.ascontiguousarray(np.asarray(weight_oihw).transpose(2, 3, 1, 0), dtype=np.float32)


def detect_arch(conv_names: list[str], source: str) -> str:
    """``resnet18``/``resnet34`` from a BasicBlock ResNet's convolution names (onnx.py)."""
    if "conv1" not in conv_names:
        raise InputError(f"{source}: not a torchvision ResNet (no stem convolution 'conv1')")
    if any(name.endswith(".conv3") for name in conv_names):
        raise InputError(f"{source}: Bottleneck ResNets are not read from ONNX yet; "
                         "only ResNet18/34")
    depth = [0, 0, 0, 0]
    for name in conv_names:
        m = _CONV_BLOCK.match(name)
        if m:
            stage = int(m.group(1)[-1]) - 1
            depth[stage] = max(depth[stage], int(m.group(2)) + 1)
    for arch, blocks in _ARCHS.items():
        if tuple(depth) == blocks:
            return arch
    raise InputError(f"{source}: ResNet with blocks per stage {tuple(depth)} is not supported; "
                     f"supported: " + ", ".join(f"{a} {b}" for a, b in _ARCHS.items()))


def split_backbone(arch: str, flat: dict[str, np.ndarray], source: str) -> ImportedModel:
    """onnx.py's folded HWIO tree -> the canonical dict of a folded source (``batchnorm=False``)."""
    del arch  # read from the tensors instead
    sd = {}
    for key, value in flat.items():
        module, _, leaf = key.rpartition(".")
        if module.endswith(".downsample"):
            module += ".0"
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        sd[f"{module}.{'weight' if leaf == 'kernel' else leaf}"] = value
    return imported(sd, source)
