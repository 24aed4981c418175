"""The whole torchvision ResNet18/34 (conv4_x backbone + ``layer4`` + global pooling + ``fc``).

Scoring never needs more than conv4_x (:mod:`ddscore_jax.model`); fine-tuning and the source
classifier's predictions do. :class:`ResNetFull` extends :class:`ddscore_jax.model.ResNetConv4`, so
its flat parameter names are torchvision's (``layer4.1.conv2.kernel``, ``fc.kernel``) and a zoo
checkpoint's ``params`` and ``head`` load into it unchanged.

BatchNorm is folded into every convolution at import, so this network has no normalisation layers:
training it updates the folded kernels and biases with the BatchNorm statistics frozen where they
were, the same network as detectron2's ``FrozenBatchNorm2d`` but with the affine map merged into
the conv.
"""

from __future__ import annotations

from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddscore_jax import model

HEAD_STAGE = "layer4"


class ResNetFull(model.ResNetConv4):
    """ResNet18/34 to logits. Input NHWC float32, ImageNet-normalised; output (N, num_classes)."""

    def __init__(self, arch: str, num_classes: int, *, rngs: nnx.Rngs):
        super().__init__(arch, rngs=rngs)
        cin, width = model.STAGE_WIDTHS[2], model.STAGE_WIDTHS[3]
        self.layer4 = nnx.List([
            model.BasicBlock(cin if i == 0 else width, width, 2 if i == 0 else 1, rngs=rngs)
            for i in range(model.ARCHS[arch][3])
        ])
        self.fc = nnx.Linear(width, num_classes, rngs=rngs)

    def pooled(self, x: jax.Array) -> jax.Array:
        """(N, H, W, 3) -> (N, 512): the output of ``layer4`` averaged over space."""
        x = nnx.relu(self.conv1(x))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for block in (*self.layer1, *self.layer2, *self.layer3, *self.layer4):
            x = block(x)
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc(self.pooled(x))


def init(arch: str, num_classes: int, *, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """A network to train from scratch, seeded: every kernel drawn from Flax's default
    distribution (LeCun normal: truncated at 2 sigma, variance 1 / fan_in), biases zero, and the
    last conv of every residual block and the classifier zero.

    With no BatchNorm nothing else keeps a deep random stack's activations in range; a zeroed
    residual branch makes each block start as (nearly) its shortcut (torchvision's
    ``zero_init_residual``), and a zero classifier starts every class at the same logit.
    """
    graphdef, abstract = _abstract(arch, num_classes)
    rng = np.random.default_rng(seed)
    flat = {}
    # Drawn with NumPy: JAX would compile one XLA program per random draw, which on a CPU takes
    # longer (seconds each) than the draws and a few training steps together.
    for key, value in sorted(model.state_to_flat(abstract).items()):
        zero = (key.endswith(".bias") or key == "fc.kernel"
                or (key.endswith("conv2.kernel") and key.split(".")[0].startswith("layer")))
        flat[key] = (np.zeros(value.shape, np.float32) if zero
                     else _lecun_normal(rng, value.shape))
    return graphdef, model.fill_state(jax.tree.map(lambda x: x, abstract), flat)


def _lecun_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # flax.nnx.initializers.lecun_normal: truncated normal on [-2, 2], rescaled to unit variance.
    std = np.sqrt(1.0 / np.prod(shape[:-1])) / 0.87962566103423978
    x = rng.standard_normal(shape)
    bad = np.abs(x) > 2
    while bad.any():
        x[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(x) > 2
    return (x * std).astype(np.float32)


@cache
def _abstract(arch: str, num_classes: int) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: ResNetFull(arch, num_classes, rngs=nnx.Rngs(0))))


def build(arch: str, num_classes: int, backbone: dict[str, np.ndarray],
          head: dict[str, np.ndarray] | None, *, seed: int = 0,
          keep_fc: bool = False) -> tuple[nnx.GraphDef, nnx.State, bool]:
    """A full network from a zoo model's flat ``backbone`` and optional flat ``head``.

    Returns ``(graphdef, state, layer4_pretrained)``. ``layer4`` comes from ``head`` when it has
    one; otherwise it is :func:`init`'s (seeded, each block's last conv zeroed), so that a fresh
    stage starts as (nearly) its shortcuts and passes the pre-trained features on instead of
    scrambling them. The classifier is new and zero (big_vision's fine-tuning default: the first
    steps move the head, not the pre-trained weights by random gradients) unless ``keep_fc``,
    which takes ``fc`` from ``head`` as it is (the source classifier; ``num_classes`` must match).
    Raises ``ValueError`` naming the parameters that do not fit ``arch``.
    """
    graphdef, state = init(arch, num_classes, seed=seed)
    flat = model.state_to_flat(state)

    model.check_shapes(backbone, model.expected_shapes(arch), arch)
    flat.update(backbone)
    head = head or {}
    stage = {k: v for k, v in head.items() if k.startswith(HEAD_STAGE + ".")}
    if stage:
        model.check_shapes(stage, {k: np.shape(v) for k, v in flat.items()
                                   if k.startswith(HEAD_STAGE + ".")},
                           f"{arch} {HEAD_STAGE}")
        flat.update(stage)
    if keep_fc:
        fc = {k: v for k, v in head.items() if k.startswith("fc.")}
        model.check_shapes(fc, {k: np.shape(v) for k, v in flat.items() if k.startswith("fc.")},
                           "the classifier")
        flat.update(fc)
    return graphdef, model.fill_state(state, flat), bool(stage)


def head_width(head: dict[str, np.ndarray] | None) -> int | None:
    """The number of source classes of a zoo model's classifier, or None when it has none."""
    if not head or "fc.kernel" not in head:
        return None
    return int(np.shape(head["fc.kernel"])[1])


def split_flat(state: nnx.State) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A full network's state -> ``(backbone, head)`` flat trees, as a zoo entry stores them."""
    flat = {k: np.asarray(v, dtype=np.float32) for k, v in model.state_to_flat(state).items()}
    backbone = {k: v for k, v in flat.items()
                if k.split(".")[0] in ("conv1", *model.BACKBONE_STAGES)}
    return backbone, {k: v for k, v in flat.items() if k not in backbone}
