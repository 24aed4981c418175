"""One ResNet v1 for the whole family, in Flax NNX, driven by :class:`ResNetConfig`.

BasicBlock and Bottleneck (stride on the 3x3, torchvision/timm "v1.5"), any stage depths, groups
(ResNeXt), per-group width (wide ResNets), timm's deep stem and average-pool shortcut (ResNet-D),
real BatchNorm layers, optional ``layer4`` + ``fc``. The module's attribute names are timm's
``resnet.py`` names, so its flat state *is* the canonical state dict below up to leaf names and
layouts (:func:`from_state_dict` / :func:`to_state_dict`, the one mapping each way).

Two ways to run it:
- as trained: :class:`ResNet` with BatchNorm (``features``, ``logits``, train or eval mode);
- for inference: :func:`fold` turns (config, state dict) into a BatchNorm-free config and state
  dict whose convolutions carry the eval-mode BatchNorm (``bn(conv(x, W)) == conv(x, W*s) + b``,
  computed in float64), and the same module runs it with convolutions, biases and ReLUs only.

Feature points: the first blocks of ``layer3`` (conv4_x), global-average-pooled, ``(N, d)`` with
d = 256 for BasicBlock nets and 1024 for every Bottleneck net (a block's output has planes x 4
channels whatever its groups or width; ``wide_resnet50_2`` and ``resnext50_32x4d`` widen only the
3x3 inside each block, so their conv4_x features are 1024-d too).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# --- Contract between the converters and the model ---------------------------------------------
# Every converter returns ``(ResNetConfig, state_dict)``: the *canonical state dict* is the
# checkpoint's own parameters as float32 NumPy arrays under timm's ``resnet.py`` names (a superset
# of torchvision's), in torch layouts (conv OIHW, ``fc.weight`` (out, in)):
#   stem      ``conv1.weight`` + ``bn1.*``; deep stem (ResNet-D) ``conv1.0.weight``, ``conv1.1.*``,
#             ``conv1.3.weight``, ``conv1.4.*``, ``conv1.6.weight`` + ``bn1.*``
#   blocks    ``layerS.B.conv{1,2[,3]}.weight`` + ``layerS.B.bn{1,2[,3]}.*``
#   shortcut  ``layerS.B.downsample.0.weight`` + ``.downsample.1.*``; with avg_down (an
#             AvgPool2d first, which has no parameters) ``.downsample.1.weight`` +
#             ``.downsample.2.*``
#   head      ``fc.weight``, ``fc.bias`` when the source has a classifier
# where ``bn*.*`` is ``weight, bias, running_mean, running_var`` (``num_batches_tracked`` dropped).
# A source whose BatchNorm was already folded away (a constant-folded ONNX graph) has no ``bn*``
# keys; its convolutions carry ``.bias`` instead and its config says ``batchnorm=False``.

StateDict = dict[str, np.ndarray]


@dataclass(frozen=True)
class ResNetConfig:
    """A ResNet v1 variant, as read from a checkpoint's tensors (never from a name or a suffix)."""

    block: Literal["basic", "bottleneck"]
    # Blocks in layer1..layer4; layer4 is 0 for a backbone-only source.
    depths: tuple[int, int, int, int]
    groups: int = 1  # cardinality (ResNeXt)
    # Per-group width of a Bottleneck (torchvision width_per_group; 128 = wide).
    base_width: int = 64
    deep_stem: bool = False  # ResNet-D: three 3x3 convs (stem_width, stem_width, 64) for the 7x7
    stem_width: int = 64  # channels of the deep stem's first two convs (timm: 32)
    avg_down: bool = False  # ResNet-D: shortcut = AvgPool2d(2, stride) + 1x1 conv of stride 1
    num_classes: int = 0  # outputs of ``fc``; 0 when the source has no classifier
    batchnorm: bool = True  # False: a folded source (conv biases, no BatchNorm layers)
    bn_eps: float = float(np.float32(1e-5))  # torch's default, as the float32 its kernel adds

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"unknown block type {self.block!r}")
        if len(self.depths) != 4 or min(self.depths[:3]) < 1 or self.depths[3] < 0:
            raise ValueError(f"depths must be 4 stage sizes, layer1..layer3 at least 1: "
                             f"{self.depths}")
        if self.block == "basic" and (self.groups != 1 or self.base_width != 64):
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        if self.num_classes and not self.depths[3]:
            raise ValueError("a classifier (fc) needs layer4")

    @property
    def expansion(self) -> int:
        return 1 if self.block == "basic" else 4

    @property
    def feature_dim(self) -> int:
        """Channels of a conv4_x block's output: 256 (BasicBlock) or 1024 (Bottleneck)."""
        return 256 * self.expansion

    @property
    def name(self) -> str:
        """A display name in torchvision/timm spelling (``resnet50``, ``resnext50_32x4d``,
        ``wide_resnet50_2``, ``resnet18d``), also for a backbone-only source of that family (its
        ``depths`` say it has no layer4); a descriptive name for depths no library names."""
        depths = self.depths if self.depths[3] else (*self.depths[:3], _LAYER4_OF.get(
            (self.block, self.depths[:3]), 0))
        depth = _NAMED_DEPTHS.get((self.block, depths))
        if depth is None:
            return f"resnet_{self.block}_{'-'.join(map(str, self.depths))}"
        d = "d" if self.deep_stem or self.avg_down else ""
        if self.groups > 1:
            # ResNeXt names give groups x per-group width: resnext50_32x4d has base_width 4.
            return f"resnext{depth}{d}_{self.groups}x{self.base_width}d"
        if self.base_width != 64:
            return f"wide_resnet{depth}{d}_{self.base_width // 64}"
        return f"resnet{depth}{d}"

    def backbone(self) -> ResNetConfig:
        """This config cut after conv4_x: what the features need."""
        return dataclasses.replace(self, depths=(*self.depths[:3], 0), num_classes=0)

    def with_classifier(self, num_classes: int) -> ResNetConfig:
        """This config to ``num_classes`` logits; a backbone-only one gets the layer4 depth of
        its named family (torchvision's), or 2 blocks when no library names its depths."""
        layer4 = self.depths[3] or _LAYER4_OF.get((self.block, self.depths[:3]), 2)
        return dataclasses.replace(self, depths=(*self.depths[:3], layer4),
                                   num_classes=num_classes)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "depths": list(self.depths)}

    @classmethod
    def from_json(cls, doc: dict) -> ResNetConfig:
        """Inverse of :meth:`to_json`; ``ValueError`` for unknown fields or bad values."""
        fields = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(doc) - fields)
        if extra:
            raise ValueError(f"unknown ResNetConfig fields {extra}")
        return cls(**{**doc, "depths": tuple(doc["depths"])})


_NAMED_DEPTHS = {
    ("basic", (2, 2, 2, 2)): 18, ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (2, 2, 2, 2)): 26, ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101, ("bottleneck", (3, 8, 36, 3)): 152,
}
_LAYER4_OF = {(b, d[:3]): d[3] for b, d in _NAMED_DEPTHS}

# torchvision's and timm's configurations, by name (tests, benchmarks, training from scratch).
CONFIGS: dict[str, ResNetConfig] = {
    "resnet18": ResNetConfig("basic", (2, 2, 2, 2), num_classes=1000),
    "resnet34": ResNetConfig("basic", (3, 4, 6, 3), num_classes=1000),
    "resnet50": ResNetConfig("bottleneck", (3, 4, 6, 3), num_classes=1000),
    "resnet101": ResNetConfig("bottleneck", (3, 4, 23, 3), num_classes=1000),
    "resnet152": ResNetConfig("bottleneck", (3, 8, 36, 3), num_classes=1000),
    "resnext50_32x4d": ResNetConfig("bottleneck", (3, 4, 6, 3), groups=32, base_width=4,
                                    num_classes=1000),
    "resnext101_32x8d": ResNetConfig("bottleneck", (3, 4, 23, 3), groups=32, base_width=8,
                                     num_classes=1000),
    "wide_resnet50_2": ResNetConfig("bottleneck", (3, 4, 6, 3), base_width=128, num_classes=1000),
    "resnet18d": ResNetConfig("basic", (2, 2, 2, 2), deep_stem=True, stem_width=32,
                              avg_down=True, num_classes=1000),
    "resnet34d": ResNetConfig("basic", (3, 4, 6, 3), deep_stem=True, stem_width=32,
                              avg_down=True, num_classes=1000),
    "resnet50d": ResNetConfig("bottleneck", (3, 4, 6, 3), deep_stem=True, stem_width=32,
                              avg_down=True, num_classes=1000),
}

STAGES = ("layer1", "layer2", "layer3", "layer4")
FEATURE_STAGE = "layer3"  # conv4_x
SCORE_BLOCKS = ("layer3.0", "layer3.1")


def block_names(config: ResNetConfig, stop_at: int | None = None) -> list[str]:
    """The feature names :meth:`ResNet.features` returns: ``["layer3.0", "layer3.1", ...]``."""
    return [f"{FEATURE_STAGE}.{i}" for i in range(config.depths[2])][:stop_at]


@dataclass
class ImportedModel:
    """One imported checkpoint, as every converter returns it and the zoo stores it: its
    architecture and its own parameters as the canonical state dict (the contract above), checked
    against the config."""

    config: ResNetConfig
    state_dict: StateDict

    @property
    def arch(self) -> str:
        """The display name (``resnet50``, ``resnet18d``, ...)."""
        return self.config.name


# --- Layers --------------------------------------------------------------------------------------

class Identity(nnx.Module):
    """A parameterless slot: keeps torch's ``nn.Sequential`` indices where a layer has no
    parameters (ReLU, identity pooling) or was folded away (BatchNorm of a folded source)."""

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return x


class ReLU(Identity):
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return nnx.relu(x)


class AvgPoolDown(Identity):
    """timm's ``AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)`` (ResNet-D shortcut)."""

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        # ceil_mode: an odd side gets a last window of one row/column, averaged over what it holds.
        pads = ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0))
        window = (1, 2, 2, 1)
        total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, pads)
        ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
        count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, window, pads)
        return total / count


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` taking the block's ``train`` flag (eval: running statistics), whose
    running variance follows torch's: updated with the unbiased batch variance (Flax's own uses
    the biased one), while the batch is normalised with the biased one, as both do."""

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if not train:
            return super().__call__(x, use_running_average=True)
        old = self.var.get_value()
        y = super().__call__(x, use_running_average=False)
        n = x.size // x.shape[-1]
        m = self.momentum
        # Flax stored m * old + (1 - m) * biased; rescale the batch's share by n / (n - 1).
        self.var.set_value(m * old + (self.var.get_value() - m * old) * (n / max(n - 1, 1)))
        return y


def _norm(channels: int, config: ResNetConfig, rngs: nnx.Rngs) -> nnx.Module:
    if not config.batchnorm:
        return Identity()
    # torch momentum 0.1 (weight of the new batch) is Flax momentum 0.9 (weight of the old).
    # Exact variance: the fast E[x^2] - E[x]^2 form loses digits on ReLU inputs.
    return BatchNorm(channels, momentum=0.9, epsilon=config.bn_eps, use_running_average=True,
                     use_fast_variance=False, rngs=rngs)


def _apply(layers, x: jax.Array, train: bool) -> jax.Array:
    for layer in layers:
        x = layer(x, train)
    return x


class Conv(nnx.Conv):
    """``nnx.Conv`` that ignores the ``train`` flag every layer of a block is called with."""

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:  # noqa: ARG002
        return super().__call__(x)


def conv_op(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None,
            rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
            precision=None, **kwargs) -> jax.Array:
    """``lax.conv_general_dilated`` (NHWC x HWIO, as ``nnx.Conv`` calls it), except that a
    convolution whose output has fewer positions than its kernel has taps is computed as one
    matrix product over the kernel's shifted windows (im2col).

    Why: XLA swaps the operands of such a convolution (ResNet's layer4 at 64 px: 3x3 kernels
    on 2x2 maps; in the backward pass also the stride-2 conv into it), and XLA:CPU runs the
    swapped form, with its reversed window, in a naive loop: 1.8 s for one 512->512 conv of a
    batch of 32, against 6 ms as a matrix product, and most of a fine-tuning step's time.
    Same sums in another order (~1e-7 relative per convolution).
    """
    k_h, k_w = rhs.shape[:2]
    s_h, s_w = window_strides
    (p_t, p_b), (p_l, p_r) = padding
    out_h = (lhs.shape[1] + p_t + p_b - k_h) // s_h + 1
    out_w = (lhs.shape[2] + p_l + p_r - k_w) // s_w + 1
    plain = (feature_group_count == 1 and all(d == 1 for d in (*(lhs_dilation or (1, 1)),
                                                               *(rhs_dilation or (1, 1)))))
    if not plain or out_h * out_w >= k_h * k_w:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
            dimension_numbers or ("NHWC", "HWIO", "NHWC"), feature_group_count,
            precision=precision, **kwargs)
    x = jnp.pad(lhs, ((0, 0), (p_t, p_b), (p_l, p_r), (0, 0)))

    def real(tap: int, stride: int, n_out: int, low: int, size: int) -> bool:
        # Does this kernel row (column) meet the input, not only padding, at some output?
        return any(low <= tap + stride * o < low + size for o in range(n_out))

    # Taps that see only padding add exact zeros: leaving them out changes no sum (a 1x1 map
    # keeps the centre tap only, as a 1x1 convolution). It also keeps the summation close to
    # torch's: with all nine taps, 3 SGD steps at 32 px (layer4 on 1x1 maps, BatchNorm over a
    # batch of 8) drifted 4e-4 from a float64 torch reference, against 2e-5 without them.
    used = [(i, j) for i in range(k_h) for j in range(k_w)
            if real(i, s_h, out_h, p_t, lhs.shape[1]) and real(j, s_w, out_w, p_l, lhs.shape[2])]
    cols = jnp.concatenate([x[:, i:i + s_h * (out_h - 1) + 1:s_h, j:j + s_w * (out_w - 1) + 1:s_w]
                            for i, j in used], axis=-1)
    # (tap, cin) column order is the row order of the kernel's taps stacked as (taps*cin, cout).
    kernel = jnp.concatenate([rhs[i, j] for i, j in used], axis=0)
    return jnp.dot(cols, kernel, precision=precision,
                   preferred_element_type=kwargs.get("preferred_element_type"))


def _conv(cin: int, cout: int, size: int, stride: int, config: ResNetConfig, rngs: nnx.Rngs,
          groups: int = 1) -> Conv:
    # Padding spelled out as torch pads: stride-2 'SAME' would pad asymmetrically and break parity.
    pad = size // 2
    return Conv(cin, cout, (size, size), strides=(stride, stride),
                padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                use_bias=not config.batchnorm, conv_general_dilated=conv_op, rngs=rngs)


def _downsample(cin: int, cout: int, stride: int, config: ResNetConfig,
                rngs: nnx.Rngs) -> nnx.List | None:
    if stride == 1 and cin == cout:
        return None
    if config.avg_down:
        pool = AvgPoolDown() if stride != 1 else Identity()
        return nnx.List([pool, _conv(cin, cout, 1, 1, config, rngs), _norm(cout, config, rngs)])
    return nnx.List([_conv(cin, cout, 1, stride, config, rngs), _norm(cout, config, rngs)])


class BasicBlock(nnx.Module):
    def __init__(self, cin: int, planes: int, stride: int, config: ResNetConfig, *,
                 rngs: nnx.Rngs):
        self.conv1 = _conv(cin, planes, 3, stride, config, rngs)
        self.bn1 = _norm(planes, config, rngs)
        self.conv2 = _conv(planes, planes, 3, 1, config, rngs)
        self.bn2 = _norm(planes, config, rngs)
        self.downsample = _downsample(cin, planes, stride, config, rngs)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        shortcut = x if self.downsample is None else _apply(self.downsample, x, train)
        y = nnx.relu(self.bn1(self.conv1(x), train))
        return nnx.relu(self.bn2(self.conv2(y), train) + shortcut)


class Bottleneck(nnx.Module):
    def __init__(self, cin: int, planes: int, stride: int, config: ResNetConfig, *,
                 rngs: nnx.Rngs):
        width = math.floor(planes * config.base_width / 64) * config.groups
        cout = planes * 4
        self.conv1 = _conv(cin, width, 1, 1, config, rngs)
        self.bn1 = _norm(width, config, rngs)
        self.conv2 = _conv(width, width, 3, stride, config, rngs, groups=config.groups)
        self.bn2 = _norm(width, config, rngs)
        self.conv3 = _conv(width, cout, 1, 1, config, rngs)
        self.bn3 = _norm(cout, config, rngs)
        self.downsample = _downsample(cin, cout, stride, config, rngs)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        shortcut = x if self.downsample is None else _apply(self.downsample, x, train)
        y = nnx.relu(self.bn1(self.conv1(x), train))
        y = nnx.relu(self.bn2(self.conv2(y), train))
        return nnx.relu(self.bn3(self.conv3(y), train) + shortcut)


class ResNet(nnx.Module):
    """A ResNet v1 from its config. Input NHWC float32, ImageNet-normalised.

    ``features(x, stop_at)`` -> the first ``stop_at`` conv4_x blocks' outputs averaged over space
    (nothing after the last one is computed); ``logits(x)`` -> ``(N, num_classes)``.
    """

    def __init__(self, config: ResNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        if config.deep_stem:
            w = config.stem_width
            self.conv1 = nnx.List([
                _conv(3, w, 3, 2, config, rngs), _norm(w, config, rngs), ReLU(),
                _conv(w, w, 3, 1, config, rngs), _norm(w, config, rngs), ReLU(),
                _conv(w, 64, 3, 1, config, rngs)])
        else:
            self.conv1 = _conv(3, 64, 7, 2, config, rngs)
        self.bn1 = _norm(64, config, rngs)
        block = BasicBlock if config.block == "basic" else Bottleneck
        cin = 64
        for stage, depth in enumerate(config.depths):
            planes = 64 * 2 ** stage
            blocks = []
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(block(cin, planes, stride, config, rngs=rngs))
                cin = planes * config.expansion
            if depth:
                setattr(self, STAGES[stage], nnx.List(blocks))
        if config.num_classes:
            self.fc = nnx.Linear(cin, config.num_classes, rngs=rngs)

    def _stem(self, x: jax.Array, train: bool) -> jax.Array:
        stem = self.conv1 if self.config.deep_stem else [self.conv1]
        x = nnx.relu(self.bn1(_apply(stem, x, train), train))
        # Flax pads max-pooling with -inf, as torch's MaxPool2d(3, 2, padding=1) does.
        return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    def __call__(self, x: jax.Array, *, stop_at: int | None = 0, logits: bool = False,
                 train: bool = False) -> dict[str, jax.Array]:
        """One pass giving ``{"layer3.i": (N, d)}`` for the first ``stop_at`` conv4_x blocks
        (``None``: all of them) and, with ``logits``, ``{"logits": (N, num_classes)}``.

        Without ``logits`` the forward stops after the last block asked for.
        """
        if logits and not self.config.num_classes:
            raise ValueError(f"{self.config.name} has no classifier (fc)")
        x = self._stem(x, train)
        for block in (*self.layer1, *self.layer2):
            x = block(x, train)
        out = {}
        wanted = self.config.depths[2] if stop_at is None else stop_at
        for i, block in enumerate(self.layer3):
            if not logits and i >= wanted:
                break
            x = block(x, train)
            if i < wanted:
                out[f"{FEATURE_STAGE}.{i}"] = jnp.mean(x, axis=(1, 2))
        if logits:
            for block in self.layer4:
                x = block(x, train)
            out["logits"] = self.fc(jnp.mean(x, axis=(1, 2)))
        return out

    @staticmethod
    def stage_names(config: ResNetConfig, stop_at: int = 2) -> list[str]:
        """The names :meth:`stages` yields, in order."""
        return ["conv1", *(f"{s}.{i}" for s, d in zip(STAGES[:2], config.depths, strict=False)
                           for i in range(d)), *block_names(config, stop_at)]

    def stages(self, x: jax.Array, stop_at: int = 2) -> Iterator[tuple[str, jax.Array]]:
        """``(name, output)`` of the stem, each layer1/layer2 block and the first ``stop_at``
        conv4_x blocks, in order (eval mode): where a forward goes wrong, stage by stage."""
        x = self._stem(x, False)
        yield "conv1", x
        for stage in STAGES[:2]:
            for i, block in enumerate(getattr(self, stage)):
                x = block(x, False)
                yield f"{stage}.{i}", x
        for i, block in enumerate(self.layer3):
            if i >= stop_at:
                return
            x = block(x, False)
            yield f"{FEATURE_STAGE}.{i}", x

    def features(self, x: jax.Array, stop_at: int | None = 2) -> dict[str, jax.Array]:
        """``{"layer3.0": (N, d), "layer3.1": (N, d)}`` (eval mode), stopping after block
        ``stop_at - 1`` of conv4_x (``None``: every block)."""
        return self(x, stop_at=stop_at)

    def logits(self, x: jax.Array, train: bool = False) -> jax.Array:
        """(N, H, W, 3) -> (N, num_classes); ``train`` uses and updates batch statistics."""
        return self(x, logits=True, train=train)["logits"]


# --- Abstract structure and the one mapping between the canonical dict and the module state ------

@cache
def abstract(config: ResNetConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, state)`` of ``config``'s module, shapes only (nothing allocated)."""
    return nnx.split(nnx.eval_shape(lambda: ResNet(config, rngs=nnx.Rngs(0))))


def graphdef(config: ResNetConfig) -> nnx.GraphDef:
    return abstract(config)[0]


# Flax leaf name -> torch leaf name. Unambiguous: a BatchNorm has no kernel, a conv no scale.
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}


def _torch_name(path: tuple) -> str:
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _TORCH_LEAF[leaf]])


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if leaf == "kernel" and value.ndim == 2:
        return value.T  # Linear (in, out) -> torch (out, in)
    return value


def _to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO, never a bare .T
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def expected_shapes(config: ResNetConfig) -> dict[str, tuple[int, ...]]:
    """The canonical state dict ``config`` takes: ``{"conv1.weight": (64, 3, 7, 7), ...}``."""
    out = {}
    for path, var in nnx.to_flat_state(abstract(config)[1]):
        shape = var.get_value().shape
        leaf = str(path[-1])
        out[_torch_name(path)] = tuple(_to_torch_layout(leaf, np.empty(shape, np.bool_)).shape)
    return out


def check_state_dict(state_dict: StateDict, config: ResNetConfig) -> None:
    """``ValueError`` listing every missing, unexpected and mis-shaped key (big_vision's
    ``merge_params`` check): nothing is loaded partially."""
    want = expected_shapes(config)
    missing = sorted(set(want) - set(state_dict))
    extra = sorted(set(state_dict) - set(want))
    bad = [f"{k} {tuple(np.shape(state_dict[k]))} != {want[k]}" for k in sorted(want)
           if k in state_dict and tuple(np.shape(state_dict[k])) != want[k]]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected {', '.join(extra)}")
    if bad:
        problems.append(f"mis-shaped {'; '.join(bad)}")
    if problems:
        raise ValueError(f"parameters do not fit {config.name}: {' | '.join(problems)}")


def from_state_dict(state_dict: StateDict, config: ResNetConfig) -> nnx.State:
    """The canonical state dict as ``config``'s ``nnx.State`` (float32 JAX arrays), after
    :func:`check_state_dict`."""
    check_state_dict(state_dict, config)
    flat = []
    for path, var in nnx.to_flat_state(abstract(config)[1]):
        value = _to_flax_layout(str(path[-1]), np.asarray(state_dict[_torch_name(path)]))
        # A copy: on CPU jnp.asarray may alias the NumPy buffer, which the caller may reuse.
        flat.append((path, var.replace(jnp.array(value, jnp.float32))))
    return nnx.from_flat_state(flat)


def to_state_dict(state: nnx.State) -> StateDict:
    """Inverse of :func:`from_state_dict`: a module state -> the canonical dict (float32 NumPy)."""
    return {_torch_name(path): np.ascontiguousarray(
                _to_torch_layout(str(path[-1]), np.asarray(var.get_value(), np.float32)))
            for path, var in nnx.to_flat_state(state)}


def build(config: ResNetConfig, state_dict: StateDict) -> ResNet:
    """A live module with ``state_dict``'s parameters."""
    return nnx.merge(graphdef(config), from_state_dict(state_dict, config))


# --- BatchNorm folding: the inference network -----------------------------------------------------

_BN_LEAVES = ("weight", "bias", "running_mean", "running_var")


def _bn_of(conv: str, keys: set[str]) -> str | None:
    """The BatchNorm right after convolution ``conv`` (canonical names), if there is one."""
    head, _, last = conv.rpartition(".")
    prefix = head + "." if head else ""
    if last.startswith("conv") and f"{prefix}{last.replace('conv', 'bn')}.weight" in keys:
        return f"{prefix}{last.replace('conv', 'bn')}"
    if last.isdigit() and f"{prefix}{int(last) + 1}.running_var" in keys:
        return f"{prefix}{int(last) + 1}"  # nn.Sequential: deep stem, downsample
    if conv == "conv1.6" and "bn1.weight" in keys:
        return "bn1"  # deep stem: its last conv is followed by the stem's bn1
    return None


def fold(config: ResNetConfig, state_dict: StateDict) -> tuple[ResNetConfig, StateDict]:
    """Fold every eval-mode BatchNorm into the convolution before it.

    Returns ``(config with batchnorm=False, state dict)`` where each ``<conv>.weight`` is
    ``W * gamma / sqrt(var + eps)`` and ``<conv>.bias`` is ``beta + (b - mean) * scale``, computed
    in float64 so that folding adds no error beyond the final rounding to float32. An already
    folded config is returned as it is.
    """
    if not config.batchnorm:
        return config, state_dict
    check_state_dict(state_dict, config)
    keys = set(state_dict)
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.endswith(".weight") and np.ndim(value) == 4:
            conv = key[: -len(".weight")]
            bn = _bn_of(conv, keys)
            if bn is None:
                raise ValueError(f"no BatchNorm after convolution {conv}")
            out[f"{conv}.weight"], out[f"{conv}.bias"] = fold_bn(
                value, state_dict.get(f"{conv}.bias"),
                *(state_dict[f"{bn}.{p}"] for p in _BN_LEAVES), config.bn_eps)
        elif key.startswith("fc."):
            out[key] = np.asarray(value, np.float32)
    folded = dataclasses.replace(config, batchnorm=False)
    check_state_dict(out, folded)
    return folded, out


def fold_bn(weight_oihw: np.ndarray, conv_bias: np.ndarray | None, gamma: np.ndarray,
            beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
            eps: float) -> tuple[np.ndarray, np.ndarray]:
    """One conv + inference BatchNorm -> (OIHW weight, bias), float32, computed in float64."""
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    bias = np.zeros_like(scale) if conv_bias is None else np.asarray(conv_bias, np.float64)
    shift = np.asarray(beta, np.float64) + (bias - np.asarray(mean, np.float64)) * scale
    weight = np.asarray(weight_oihw, np.float64) * scale[:, None, None, None]
    return weight.astype(np.float32), shift.astype(np.float32)


def inference(config: ResNetConfig, state_dict: StateDict, *,
              backbone: bool = False) -> tuple[ResNetConfig, nnx.State]:
    """``(folded config, nnx.State)`` of the BatchNorm-free inference network; ``backbone`` cuts
    it after conv4_x (what the features need: layer4 and fc never reach the device)."""
    if backbone and (config.depths[3] or config.num_classes):
        cut = config.backbone()
        state_dict = {k: v for k, v in state_dict.items()
                      if not k.startswith(("layer4.", "fc."))}
        config = cut
    folded, sd = fold(config, state_dict)
    return folded, from_state_dict(sd, folded)


def apply(config: ResNetConfig, state: nnx.State, images: jax.Array, *,
          stop_at: int | None = 0, logits: bool = False,
          train: bool = False) -> dict[str, jax.Array]:
    """Pure forward over an explicit state (jit/vmap freely): see :meth:`ResNet.__call__`."""
    return nnx.merge(graphdef(config), state)(images, stop_at=stop_at, logits=logits, train=train)


# --- The one initialiser --------------------------------------------------------------------------

def init_state_dict(config: ResNetConfig, seed: int = 0, *,
                    zero_init_residual: bool = False) -> StateDict:
    """Freshly initialised canonical parameters, as torchvision initialises a ResNet.

    Convolutions: Kaiming normal, fan_out, ReLU gain (``std = sqrt(2 / (out * kh * kw))``);
    BatchNorm weight 1, bias 0, running mean 0, variance 1; ``fc`` torch's ``nn.Linear`` default
    (uniform in +-1/sqrt(in) for weight and bias); conv biases (folded configs) 0.
    ``zero_init_residual`` zeroes the last BatchNorm's weight of every residual branch (the last
    conv's weight when there is no BatchNorm), so that each block starts as its shortcut.
    Drawn with NumPy: JAX would compile a program per parameter shape, which on a CPU costs more
    than the draws. Seeded: the same seed gives the same parameters.
    """
    rng = np.random.default_rng(seed)
    last = "bn2" if config.block == "basic" else "bn3"
    shapes = expected_shapes(config)
    out: StateDict = {}
    for key, shape in shapes.items():
        module, _, leaf = key.rpartition(".")
        if key.startswith("fc."):
            bound = 1.0 / math.sqrt(shapes["fc.weight"][1])
            value = rng.uniform(-bound, bound, shape)
        elif leaf == "weight" and len(shape) == 4:
            std = math.sqrt(2.0 / (shape[0] * shape[2] * shape[3]))
            value = rng.standard_normal(shape) * std
            if (zero_init_residual and not config.batchnorm and module.startswith("layer")
                    and module.endswith(last.replace("bn", "conv"))):
                value = np.zeros(shape)
        elif leaf in ("weight", "running_var"):
            residual_end = module.startswith("layer") and module.endswith(last)
            value = np.zeros(shape) if (zero_init_residual and residual_end
                                        and leaf == "weight") else np.ones(shape)
        else:  # BatchNorm bias and running mean, conv biases
            value = np.zeros(shape)
        out[key] = value.astype(np.float32)
    return out
