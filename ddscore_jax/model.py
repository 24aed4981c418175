"""torchvision-layout ResNet18/34 in Flax NNX, cut after the conv4_x stage (``layer3``).

The zoo stores every model in one representation: each convolution carries its BatchNorm folded in
(inference BatchNorm is a per-channel affine map, so ``bn(conv(x, W)) == conv(x, W * s) + b``). A
torchvision ``.pth``, a constant-folded ONNX graph and an unfolded one all become the same tree, and
there is one forward function.

Parameter trees travel in two shapes:
- *flat*: ``{"layer1.0.conv1.kernel": array, ...}`` with torchvision's module names (converters);
- *state*: the ``nnx.State`` of :class:`ResNetConv4` (what :func:`forward` takes).
"""

from __future__ import annotations

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


# Blocks per stage; both use torchvision's BasicBlock.
ARCHS: dict[str, tuple[int, int, int, int]] = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
}
STAGE_WIDTHS = (64, 128, 256, 512)
FEATURE_DIM = STAGE_WIDTHS[2]
# The stages kept; layer4 and fc are never needed for the features.
BACKBONE_STAGES = ("layer1", "layer2", "layer3")


def _conv(cin: int, cout: int, size: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    # Padding spelled out as torch pads: stride-2 'SAME' would pad asymmetrically and break parity.
    pad = size // 2
    return nnx.Conv(
        cin, cout, (size, size), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        use_bias=True, rngs=rngs,
    )


class BasicBlock(nnx.Module):
    """torchvision's BasicBlock with BatchNorm folded into conv1, conv2 and the downsample conv."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = _conv(cin, cout, 3, stride, rngs)
        self.conv2 = _conv(cout, cout, 3, 1, rngs)
        self.downsample = _conv(cin, cout, 1, stride, rngs) if stride != 1 or cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if self.downsample is None else self.downsample(x)
        y = nnx.relu(self.conv1(x))
        return nnx.relu(self.conv2(y) + identity)


class ResNetConv4(nnx.Module):
    """ResNet up to and including conv4_x. Input NHWC float32, ImageNet-normalised."""

    def __init__(self, arch: str, *, rngs: nnx.Rngs):
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHS)}")
        self.arch = arch
        self.conv1 = _conv(3, STAGE_WIDTHS[0], 7, 2, rngs)
        cin = STAGE_WIDTHS[0]
        for stage, (depth, width) in enumerate(zip(ARCHS[arch][:3], STAGE_WIDTHS[:3], strict=True)):
            stride = 1 if stage == 0 else 2
            blocks = []
            for i in range(depth):
                blocks.append(BasicBlock(cin, width, stride if i == 0 else 1, rngs=rngs))
                cin = width
            setattr(self, BACKBONE_STAGES[stage], nnx.List(blocks))

    def __call__(self, x: jax.Array, num_blocks: int | None = None) -> dict[str, jax.Array]:
        """Return ``{"layer3.i": (N, 256)}``: each conv4_x block's output, averaged over space.

        ``num_blocks`` stops after that many conv4_x blocks (D-deepscore needs the first two), so
        the rest of the stage is never computed.
        """
        x = nnx.relu(self.conv1(x))
        # Flax pads max-pooling with -inf, as torch's MaxPool2d(3, 2, padding=1) does.
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for block in (*self.layer1, *self.layer2):
            x = block(x)
        out = {}
        for i, block in enumerate(self.layer3[:num_blocks]):
            x = block(x)
            out[f"layer3.{i}"] = jnp.mean(x, axis=(1, 2))
        return out


def block_names(arch: str, num_blocks: int | None = None) -> list[str]:
    """The feature names the forward returns for ``arch``: ``["layer3.0", "layer3.1", ...]``."""
    return [f"layer3.{i}" for i in range(ARCHS[arch][2])][:num_blocks]


@cache
def _abstract(arch: str) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: ResNetConv4(arch, rngs=nnx.Rngs(0))))


def graphdef(arch: str) -> nnx.GraphDef:
    return _abstract(arch)[0]


def init_flat(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Freshly initialised parameters (Flax's default init) as a flat tree."""
    return state_to_flat(nnx.state(ResNetConv4(arch, rngs=nnx.Rngs(seed))))


def expected_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """``{"conv1.kernel": (7, 7, 3, 64), ...}``: what a converter must produce for ``arch``."""
    return {k: tuple(v.shape) for k, v in state_to_flat(_abstract(arch)[1]).items()}


def state_to_flat(state: nnx.State) -> dict[str, np.ndarray]:
    """``nnx.State`` -> ``{"layer1.0.conv1.kernel": array}`` (arrays left as they are)."""
    flat = nnx.to_flat_state(state)
    return {".".join(str(k) for k in path): v.get_value() for path, v in flat}


def check_shapes(flat: dict[str, np.ndarray], want: dict[str, tuple[int, ...]], what: str) -> None:
    """Raise ``ValueError`` naming the missing, unexpected or mis-shaped keys of ``flat``."""
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    if missing or extra:
        raise ValueError(
            f"parameters do not match {what}: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    bad = [f"{k} {tuple(np.shape(flat[k]))} != {tuple(want[k])}" for k in want
           if tuple(np.shape(flat[k])) != tuple(want[k])]
    if bad:
        raise ValueError(f"parameter shapes do not match {what}: {'; '.join(bad[:4])}")


def fill_state(state: nnx.State, flat: dict[str, np.ndarray]) -> nnx.State:
    """Put a flat tree's arrays (as float32) into ``state`` in place; return it."""
    pure: dict = {}
    for key, value in flat.items():
        node = pure
        *parents, leaf = [int(p) if p.isdigit() else p for p in key.split(".")]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value, dtype=jnp.float32)
    nnx.replace_by_pure_dict(state, pure)
    return state


def flat_to_state(flat: dict[str, np.ndarray], arch: str) -> nnx.State:
    """Check a flat tree against ``arch``'s init (every key, every shape) and return its state.

    Raises ``ValueError`` naming the missing, unexpected or mis-shaped parameters.
    """
    check_shapes(flat, expected_shapes(arch), arch)
    # A copy: the cached abstract state stays abstract.
    return fill_state(jax.tree.map(lambda x: x, _abstract(arch)[1]), flat)


def forward(arch: str, state: nnx.State, images: jax.Array,
            num_blocks: int | None = None) -> dict[str, jax.Array]:
    """Pure forward: ``images`` (N, H, W, 3) -> ``{"layer3.i": (N, 256)}``. Jit/vmap freely."""
    return nnx.merge(graphdef(arch), state)(images, num_blocks)
