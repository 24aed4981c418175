"""The one trainer against PyTorch: the same network, weights, batches and optimiser.

A torchvision ResNet18 with randomised BatchNorm, imported through the converter, trained a few
steps with plain SGD in both libraries: BatchNorm in training mode (batch statistics forward,
running statistics updated with momentum 0.1 and the unbiased batch variance) must give the same
parameters and running statistics.
"""

import jax
import numpy as np
import torch
from helpers import save_pth, torch_resnet

from ddscore_jax import model, train
from ddscore_jax.converters import load_checkpoint

STEPS = 3
BATCH = 8
SIZE = 32
CLASSES = 3


def _torch_sgd(net, x: np.ndarray, y: np.ndarray, batches: list[np.ndarray], lr: float):
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(y)
    for idx in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
        loss.backward()
        opt.step()
    return {k: v.detach().numpy() for k, v in net.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def _batches(seed: int, n: int, batch: int, steps: int) -> list[np.ndarray]:
    # The trainer's order: consecutive seeded permutations.
    rng = np.random.default_rng(seed)
    order = np.empty(0, np.int64)
    out = []
    for _ in range(steps):
        while len(order) < batch:
            order = np.concatenate([order, rng.permutation(n)])
        out.append(order[:batch])
        order = order[batch:]
    return out


def test_sgd_with_batchnorm_matches_pytorch(tmp_path):
    net = torch_resnet("resnet18", seed=5, num_classes=CLASSES)
    imported = load_checkpoint(save_pth(net, tmp_path / "r18.pth"))
    assert imported.config.batchnorm and imported.config.num_classes == CLASSES
    rng = np.random.default_rng(0)
    n = 12
    x = rng.normal(size=(n, SIZE, SIZE, 3)).astype(np.float32)
    y = rng.integers(0, CLASSES, n)
    lr = 0.01
    recipe = train.Recipe(batch_size=BATCH, optimizer="sgd", learning_rate=lr, momentum=0.0,
                          weight_decay=0.0, schedule="constant", clip_norm=0.0)
    trainer = train.Trainer(imported.config, recipe)
    with jax.default_matmul_precision("highest"):
        state, _ = trainer.train(model.from_state_dict(imported.state_dict, imported.config),
                                 x, y, STEPS, seed=3)
    ours = model.to_state_dict(state)
    ref = _torch_sgd(net, x, y, _batches(3, n, BATCH, STEPS), lr)
    assert set(ours) == set(ref)
    moved = 0
    for key, want in ref.items():
        err = np.max(np.abs(ours[key] - want)) / max(np.max(np.abs(want)), 1e-12)
        # float32 forward and backward in two libraries: 1e-4 of each tensor's scale.
        assert err < 1e-4, (key, err)
        moved += not np.allclose(want, imported.state_dict[key], rtol=0, atol=1e-7)
    # Every parameter and every running statistic moved, so each comparison above says something.
    assert moved == len(ref), moved


def test_the_training_step_has_no_operand_swapped_convolution():
    # XLA swaps the operands of a convolution whose kernel has more taps than its input has
    # positions (layer4's 3x3 convs on 2x2 maps at 64 px, and their backward) into a form with
    # a reversed window, which XLA:CPU runs in a naive loop: 1.8 s per conv, most of a step.
    # model.conv_op computes those as matrix products; no reversed window may be left.
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    config = dataclasses.replace(model.CONFIGS["resnet18"], num_classes=CLASSES)
    trainer = train.Trainer(config, train.Recipe(optimizer="sgd", momentum=0.0,
                                                 weight_decay=0.0))
    params, stats = nnx.split_state(model.from_state_dict(model.init_state_dict(config, 0),
                                                          config), nnx.Param, nnx.BatchStat)
    hlo = trainer._step.lower(
        params, stats, trainer.tx.init(params), jnp.zeros((2, 64, 64, 3)),
        jnp.zeros(2, jnp.int32), jnp.float32(0.1), jax.random.key(0)).compile().as_text()
    convs = [line for line in hlo.splitlines() if " convolution(" in line]
    assert len(convs) > 20  # the step's convolutions are there to inspect
    assert not [c for c in convs if "rhs_reversal" in c]
