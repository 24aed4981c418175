"""The architecture of a canonical ResNet state dict, read from its tensors (never from a name).

The canonical names and layouts are the contract in ``ddscore_jax.model``: timm/torchvision names,
torch layouts. :func:`detect_config` reads block type, depths, groups, widths, stem and shortcut
from the tensors, and the state dict is checked against ``ddscore_jax.model.expected_shapes`` of
that configuration key by key, so that any layer the v1 model does not have (a
squeeze-and-excitation module, a convolutional stem pool, a tiered stem) is refused here with a
line that says what it is, instead of being dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ddscore_jax import model
from ddscore_jax.errors import InputError
from ddscore_jax.model import ResNetConfig

# Buffers that carry no inference state.
IGNORED_SUFFIXES = (".num_batches_tracked",)
_STEM_OUT = 64  # torchvision/timm ``inplanes`` after the stem (timm's deep stem: 2 * stem_width)

# Keys of layers the v1 model does not have, and what they are (for the refusal's one line).
_KNOWN_EXTRAS = (
    (re.compile(r"^layer\d\.\d+\.(se|attn)\."), "squeeze-and-excitation/attention layers in its "
     "blocks (SE-ResNet, ECA-ResNet and kin)"),
    (re.compile(r"^maxpool\."), "a convolution in place of the stem max-pool (timm "
     "replace_stem_pool: ResNet-RS and kin)"),
    (re.compile(r"\.aa\."), "anti-aliased downsampling layers"),
    (re.compile(r"\.drop_block\."), "DropBlock layers with state"),
)


def shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def detect_config(sd: Mapping[str, Any], source: str) -> ResNetConfig:
    """The :class:`ResNetConfig` of a canonical state dict (values: anything with ``.shape``).

    Raises InputError naming ``source`` when the tensors are not a complete ResNet v1 that the
    model can represent; checks every key and shape against the configuration it reads.
    """
    deep_stem = "conv1.0.weight" in sd
    if not deep_stem and "conv1.weight" not in sd:
        raise InputError(f"{source}: not a ResNet: no stem convolution 'conv1.weight'")
    block = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    depths = []
    for stage in range(1, 5):
        n = 0
        while f"layer{stage}.{n}.conv1.weight" in sd:
            n += 1
        depths.append(n)
    missing_stage = next((s for s in range(3) if depths[s] == 0), None)
    if missing_stage is not None:
        raise InputError(f"{source}: incomplete ResNet: no blocks 'layer{missing_stage + 1}.*' "
                         "(the features are taken in layer3)")
    groups, base_width = 1, 64
    if block == "bottleneck":
        width, per_group = shape(sd["layer1.0.conv2.weight"])[:2]
        if per_group <= 0 or width % per_group:
            raise InputError(f"{source}: 'layer1.0.conv2.weight' has shape "
                             f"{shape(sd['layer1.0.conv2.weight'])}: not a grouped 3x3 conv")
        groups = width // per_group
        # layer1 has planes = 64, so width = base_width * groups there (torchvision/timm formula).
        base_width = width // groups
    stem_width = shape(sd["conv1.0.weight"])[0] if deep_stem else 64
    if deep_stem:
        _check_deep_stem(sd, source)
    avg_down = any(len(shape(v)) == 4 for k, v in sd.items()
                   if re.fullmatch(r"layer\d\.\d+\.downsample\.1\.weight", k))
    num_classes = shape(sd["fc.weight"])[0] if "fc.weight" in sd else 0
    try:
        config = ResNetConfig(block=block, depths=tuple(depths), groups=groups,
                              base_width=base_width, deep_stem=deep_stem, stem_width=stem_width,
                              avg_down=avg_down, num_classes=num_classes)
    except ValueError as e:
        raise InputError(f"{source}: out of scope: not a ResNet v1 the model has ({e})") from None
    check_state_dict(sd, config, source)
    return config


def describe(config: ResNetConfig) -> str:
    """``"bottleneck ResNet (3, 4, 6, 3), groups 32, base width 4, deep stem"``: for messages."""
    parts = [f"{config.block} ResNet {config.depths}"]
    if config.groups != 1 or config.base_width != 64:
        parts.append(f"groups {config.groups}, base width {config.base_width}")
    if config.deep_stem:
        parts.append(f"deep stem of width {config.stem_width}")
    if config.avg_down:
        parts.append("average-pool shortcut")
    return ", ".join(parts)


def check_state_dict(sd: Mapping[str, Any], config: ResNetConfig, source: str) -> None:
    """InputError naming ``source`` and the first offending tensor unless ``sd`` holds exactly
    the tensors of ``config`` with their shapes (``num_batches_tracked`` aside)."""
    want = model.expected_shapes(config)
    keys = [k for k in sd if not k.endswith(IGNORED_SUFFIXES)]
    extra = [k for k in keys if k not in want]
    if extra:
        for pattern, what in _KNOWN_EXTRAS:
            hit = next((k for k in extra if pattern.search(k)), None)
            if hit:
                raise InputError(f"{source}: out of scope: this ResNet has {what} ('{hit}'), "
                                 "which the ResNet v1 model does not have")
        if config.block == "basic" and any(".conv3." in k for k in extra):
            raise InputError(f"{source}: not a ResNet: some blocks have a third convolution "
                             f"('{next(k for k in extra if '.conv3.' in k)}') and some do not")
        raise InputError(f"{source}: out of scope: tensor '{extra[0]}' is not part of a "
                         f"{describe(config)}" + (f" (and {len(extra) - 1} more)"
                                                  if len(extra) > 1 else ""))
    missing = [k for k in want if k not in sd]
    if missing:
        raise InputError(f"{source}: incomplete ResNet: tensor '{missing[0]}' is missing"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for k, w in want.items():
        got = shape(sd[k])
        if got != w:
            raise InputError(f"{source}: out of scope: '{k}' has shape {got}, where a "
                             f"{describe(config)} has {w}")


def _check_deep_stem(sd: Mapping[str, Any], source: str) -> None:
    # timm's two deep stems that ResNetConfig's (stem_width, stem_width, 64) cannot hold: the
    # tiered one of resnet*t (24, 32, 64) and the wide one of resnet*s (64, 64, 128).
    widths = [shape(sd[k])[0] for k in ("conv1.0.weight", "conv1.3.weight", "conv1.6.weight")
              if k in sd]
    if len(widths) == 3 and widths[0] != widths[1]:
        raise InputError(f"{source}: out of scope: a tiered deep stem {tuple(widths)} (timm "
                         "resnet*t); the model's deep stem has two equal widths, then 64")
    if len(widths) == 3 and widths[2] != _STEM_OUT:
        raise InputError(f"{source}: out of scope: a deep stem ending in {widths[2]} channels "
                         f"(timm resnet*s); the model's deep stem ends in {_STEM_OUT}")
