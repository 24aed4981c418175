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

