"""Where the ResNet is in a flat checkpoint, and its tensors under the canonical names.

A checkpoint's tensors arrive as one flat mapping with dotted names, whatever nested them
(``state_dict.module.conv1.weight`` for the ImageNet example's ``.pth.tar``, ``state_dict.net.``
for Lightning, ``timm_model.`` for transformers' TimmWrapper, ``resnet.embedder...`` for
transformers' own ResNet). :func:`find_resnet` finds the one prefix under which a complete ResNet
lives, in one of two name layouts:

- ``torchvision``: torchvision's and timm's ``resnet.py`` names, already canonical;
- ``transformers``: ``ResNetModel``/``ResNetForImageClassification`` names, renamed here.

Values are left as they are (torch tensors or NumPy arrays): only the ResNet's tensors are
converted afterwards, never an optimizer state that shares the file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ddscore_jax.converters import encoders
from ddscore_jax.errors import InputError

Layout = Literal["torchvision", "transformers"]

# A layout is recognised by two tensors a ResNet of it always has, the stem and the first block.
_TV_BLOCK = "layer1.0.conv1.weight"
_TV_STEMS = ("conv1.weight", "conv1.0.weight")
_HF_BLOCK = "encoder.stages.0.layers.0.layer.0.convolution.weight"
_HF_STEM = "embedder.embedder.convolution.weight"

# Networks that are not ResNet v1, recognised by a tensor name they always have; for the refusal.
_OTHER_NETWORKS = (
    (re.compile(r"(^|\.)stages\.0\.blocks\.0\.norm1\.|(^|\.)stem\.conv\.weight$"),
     "a pre-activation ResNet (ResNet v2, e.g. timm resnetv2_*)"),
    (re.compile(r"(^|\.)(patch_embed|cls_token|pos_embed)"), "a vision transformer"),
    (re.compile(r"(^|\.)conv_stem\.weight$"), "an EfficientNet/MobileNet-family network"),
    (re.compile(r"(^|\.)stages\.0\.blocks\.0\.conv_dw\."), "a ConvNeXt"),
    (re.compile(r"(^|\.)features\.0\.(0\.)?weight$"), "a torchvision VGG/MobileNet/AlexNet-style "
     "network"),
)


@dataclass(frozen=True)
class Found:
    """A ResNet located in a flat checkpoint: its layout and the prefix of its tensors."""

    layout: Layout
    prefix: str
    # Where the saving project's convention picked one of two encoders (:mod:`.encoders`): the
    # prefixes of the others, and the reason, for the warning.
    dropped: tuple[str, ...] = ()
    chose: str | None = None
    aliases: tuple[str, ...] = ()  # the same ResNet under other names (its tensors equal)


def find_resnet(tensors: Mapping[str, Any], source: str) -> Found:
    """The one ResNet in ``tensors``. InputError naming ``source`` when there is none (saying
    what the network is where it can tell) or more than one (naming each prefix), unless the
    prefixes are a self-supervised project's pair of encoders (:func:`.encoders.choose`)."""
    found = [Found("torchvision", p) for p in _prefixes(tensors, _TV_BLOCK)
             if any(p + stem in tensors for stem in _TV_STEMS)]
    found += [Found("transformers", p) for p in _prefixes(tensors, _HF_BLOCK)
              if p + _HF_STEM in tensors]
    if len(found) == 1:
        return found[0]
    if found and {f.layout for f in found} == {"torchvision"}:
        choice = encoders.choose([f.prefix for f in found], tensors)
        if choice is not None:
            return Found("torchvision", choice.prefix, choice.dropped, choice.note,
                         choice.aliases)
    if found:
        names = " and ".join(f"'{f.prefix}'" if f.prefix else "the top level" for f in found)
        raise InputError(f"{source}: {len(found)} ResNets in one file, under {names}: save the "
                         "one you want on its own (torch.save(module.state_dict(), PATH))")
    for pattern, what in _OTHER_NETWORKS:
        if any(pattern.search(k) for k in tensors):
            raise InputError(f"{source}: out of scope: {what}, not a ResNet v1")
    first = next(iter(tensors), None)
    raise InputError(f"{source}: not a ResNet: no '{_TV_STEMS[0]}' with '{_TV_BLOCK}' (or a "
                     f"transformers ResNet's '{_HF_STEM}') under any prefix"
                     + (f"; its first tensor is '{first}'" if first else "; it holds no tensors"))


def canonical(tensors: Mapping[str, Any], found: Found, source: str) -> dict[str, Any]:
    """The ResNet's tensors under canonical names (``ddscore_jax.model``'s contract); values are
    passed through untouched and ``num_batches_tracked`` buffers are dropped."""
    p = found.prefix
    mine = {k[len(p):]: v for k, v in tensors.items()
            if k.startswith(p) and not k.endswith(".num_batches_tracked")}
    if found.layout == "torchvision":
        return mine
    sd = {}
    for key, value in mine.items():
        name = _hf_to_canonical(key)
        if name is None:
            raise InputError(f"{source}: tensor '{p}{key}' is not part of a transformers ResNet")
        sd[name] = value
    # ResNetForImageClassification keeps its head beside the ``resnet.`` module, not under it.
    if p.endswith("resnet."):
        outer = p[: -len("resnet.")]
        for param in ("weight", "bias"):
            if f"{outer}classifier.1.{param}" in tensors:
                sd[f"fc.{param}"] = tensors[f"{outer}classifier.1.{param}"]
    return sd


_HF_CONV = re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\."
                      r"(convolution|normalization)\.(\w+)$")
_HF_SHORTCUT = re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\."
                          r"(convolution|normalization)\.(\w+)$")
_HF_EMBED = re.compile(r"^embedder\.embedder\.(convolution|normalization)\.(\w+)$")


def _hf_to_canonical(key: str) -> str | None:
    """transformers ``modeling_resnet`` name -> torchvision name (None: not a ResNet tensor).

    ``stages.S.layers.B.layer.K`` is block B of torchvision's ``layer{S+1}``, its convolution K+1
    and the BatchNorm after it; ``shortcut`` is torchvision's ``downsample`` (conv ``.0``, BN
    ``.1``); the embedder is the stem.
    """
    if m := _HF_EMBED.match(key):
        kind, param = m.groups()
        return f"conv1.{param}" if kind == "convolution" else f"bn1.{param}"
    if m := _HF_CONV.match(key):
        stage, block, conv, kind, param = m.groups()
        base = f"layer{int(stage) + 1}.{block}"
        k = int(conv) + 1
        return f"{base}.conv{k}.{param}" if kind == "convolution" else f"{base}.bn{k}.{param}"
    if m := _HF_SHORTCUT.match(key):
        stage, block, kind, param = m.groups()
        index = 0 if kind == "convolution" else 1
        return f"layer{int(stage) + 1}.{block}.downsample.{index}.{param}"
    return None


def check_transformers_config(config: Mapping[str, Any] | None, source: str) -> None:
    """Refuse the transformers ResNet options that the tensors cannot show and the model does not
    have. ``config`` is the checkpoint's ``config.json`` (None: transformers' defaults, which the
    model matches)."""
    if not config:
        return
    if config.get("downsample_in_bottleneck"):
        raise InputError(f"{source}: out of scope: downsample_in_bottleneck=true (stride in the "
                         "first 1x1 conv of a Bottleneck); the model strides in the 3x3 conv, "
                         "as torchvision and timm do")
    if config.get("downsample_in_first_stage"):
        raise InputError(f"{source}: out of scope: downsample_in_first_stage=true (a stride-2 "
                         "first stage), which torchvision-style ResNets do not have")
    act = config.get("hidden_act", "relu")
    if act != "relu":
        raise InputError(f"{source}: out of scope: hidden_act={act!r}; the model uses relu")


# timm ResNets whose extra layers have no tensors (anti-aliasing by average or blur pooling), so
# that only the name their config.json gives tells them from a plain ResNet.
_TIMM_TENSORLESS = re.compile(r"aa|blur")


def check_timm_config(config: Mapping[str, Any] | None, source: str) -> None:
    """Refuse a timm model (hub folder or TimmWrapper ``config.json``) whose differences from a
    ResNet v1 leave no trace in its tensors: anti-aliased downsampling, dilation."""
    if not config or not isinstance(config.get("architecture"), str):
        return
    arch = config["architecture"].split(".")[0]
    if _TIMM_TENSORLESS.search(arch):
        raise InputError(f"{source}: out of scope: config.json names timm architecture {arch!r}, "
                         "whose anti-aliased (average/blur-pool) downsampling the model does not "
                         "have and the tensors cannot show")
    args = config.get("model_args") or {}
    if isinstance(args, dict) and args.get("output_stride") not in (None, 32):
        raise InputError(f"{source}: out of scope: output_stride={args['output_stride']} "
                         "(dilated convolutions), which the model does not have")


def _prefixes(tensors: Mapping[str, Any], marker: str) -> list[str]:
    """Every prefix (``""`` or ending in ``.``) under which ``marker`` is a tensor name."""
    out = []
    for key in tensors:
        if key.endswith(marker):
            p = key[: -len(marker)]
            if p == "" or p.endswith("."):
                out.append(p)
    return out
