"""The one trainer: a :class:`ddscore_jax.model.ResNet` to logits, softmax cross-entropy, optax.

Used by ``finetune`` (the ground truth), by the demo's pre-training and by the transfer
benchmark's. BatchNorm trains as BatchNorm: batch statistics in the training forward, running
statistics updated with torch's momentum 0.1 and unbiased batch variance (:class:`model.BatchNorm`)
and used for evaluation, which runs through the forward engine (:class:`forward.ZooForward`:
padded batches, one compile per shape).

Speed (docs/finetune.md). One compiled step per (network config, optimiser): parameters, batch
statistics, optimiser state and the learning rate are arguments, never closed over, so every
model of a zoo, every learning rate and every seed reuse it. The host never waits on the step it
has just dispatched: it reads the loss of the step before (one step in flight), so batch
gathering and dispatch overlap the device's work and progress stays at most a step ahead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ddscore_jax import model
from ddscore_jax.model import ResNetConfig
from ddscore_jax.settings import OPTIMIZERS, SCHEDULES, Optimizer, Schedule  # noqa: F401


@dataclass(frozen=True)
class Recipe:
    """How to train: the batch, the optimiser and its schedule, augmentation."""

    batch_size: int = 32
    optimizer: Optimizer = "adamw"
    learning_rate: float = 1e-3  # peak
    momentum: float = 0.9  # sgd only; 0 is plain SGD
    weight_decay: float = 1e-4  # decoupled (adamw) or L2 added to the gradient (sgd, as torch)
    schedule: Schedule = "cosine"
    clip_norm: float = 0.0  # clip gradients to this global norm; 0: no clipping
    flip: bool = False  # random horizontal flips

    def rate(self, step: int, total: int) -> float:
        """The learning rate of ``step`` (0-based) of ``total``: cosine decay to 0, or constant."""
        if self.schedule == "constant":
            return self.learning_rate
        return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * step / total))


def schedule_length(batch_size: int, epochs: float, n: int) -> tuple[int, int]:
    """``(batch, steps)`` for ``n`` training images: the batch clipped to n, and enough steps for
    ``epochs`` passes over the data (at least one)."""
    batch = min(batch_size, n)
    return batch, max(1, math.ceil(epochs * n / batch))


def _direction(optimizer: str, momentum: float, weight_decay: float,
               clip_norm: float) -> optax.GradientTransformation:
    # The update before the learning rate: the rate is an argument of the step, computed on the
    # host, so one compiled step serves every rate and run length.
    clip = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    if optimizer == "sgd":
        # L2 decay joins the gradient before momentum, as torch.optim.SGD's weight_decay does.
        decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
        trace = [optax.trace(decay=momentum)] if momentum else []
        return optax.chain(*clip, *decay, *trace) if clip or decay or trace else optax.identity()
    return optax.chain(*clip, optax.scale_by_adam(), optax.add_decayed_weights(weight_decay))


def _train_step(graphdef, tx, flip: bool, params, stats, opt_state, x, y, lr, key):
    if flip:
        mirror = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
        x = jnp.where(mirror, x[:, :, ::-1, :], x)

    def loss_fn(p, s):
        # copy: fresh Variables at this trace level, which BatchNorm may then update.
        net = nnx.merge(graphdef, p, s, copy=True)
        logits = net.logits(x, train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, nnx.state(net, nnx.BatchStat)

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
    direction, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, d: p - lr * d, params, direction)
    return params, stats, opt_state, loss


@cache
def _compiled(config: ResNetConfig, optimizer: str, momentum: float, weight_decay: float,
              clip_norm: float, flip: bool):
    # Cached per process: every Trainer of one config and optimiser shares one jitted step, so
    # it is traced and compiled once (the persistent cache then serves later processes).
    tx = _direction(optimizer, momentum, weight_decay, clip_norm)
    step = jax.jit(partial(_train_step, model.graphdef(config), tx, flip),
                   donate_argnums=(0, 1, 2))
    return tx, step


class Trainer:
    """Trains :class:`ddscore_jax.model.ResNet` states of one config with one recipe."""

    def __init__(self, config: ResNetConfig, recipe: Recipe):
        if not config.num_classes:
            raise ValueError(f"{config.name} has no classifier (fc) to train")
        self.config = config
        self.recipe = recipe
        self.tx, self._step = _compiled(config, recipe.optimizer, recipe.momentum,
                                        recipe.weight_decay, recipe.clip_norm, recipe.flip)

    def train(self, state: nnx.State, x: np.ndarray, y: np.ndarray, steps: int, *,
              seed: int = 0, on_step: Callable[[int, int], None] | None = None,
              ) -> tuple[nnx.State, float]:
        """Train ``state`` ``steps`` steps on inputs (n, S, S, 3) and labels (n,).

        Returns ``(state, loss)``, the loss being the mean over the last pass's worth of steps
        (one batch's is too noisy). Batches (of ``min(batch_size, n)``) come from consecutive
        permutations seeded by ``seed``, so every image is seen once before any is seen twice
        and every model gets the same sequence. ``on_step(done, steps)`` reports progress.
        """
        r = self.recipe
        n = len(x)
        batch = min(r.batch_size, n)
        rng = np.random.default_rng(seed)
        flip_key = jax.random.key(seed)
        # The caller's state is not ours to donate.
        params, stats = nnx.split_state(jax.tree.map(jnp.array, state), nnx.Param, nnx.BatchStat)
        opt_state = self.tx.init(params)
        order = np.empty(0, dtype=np.int64)
        losses: list[jax.Array] = []
        for i in range(steps):
            while len(order) < batch:
                order = np.concatenate([order, rng.permutation(n)])
            idx, order = order[:batch], order[batch:]
            params, stats, opt_state, loss = self._step(
                params, stats, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx], jnp.int32),
                jnp.float32(r.rate(i, steps)), jax.random.fold_in(flip_key, i))
            losses.append(loss)
            if i:
                # Wait for the step before this one only: this one is already queued.
                losses[i - 1].block_until_ready()
                if on_step is not None:
                    on_step(i, steps)
        tail = losses[-max(1, math.ceil(n / batch)):]
        mean = float(np.mean([float(v) for v in tail])) if tail else float("nan")
        if on_step is not None and steps:
            on_step(steps, steps)
        return nnx.merge_state(params, stats), mean

    def logits(self, state: nnx.State, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(n, S, S, 3) -> (n, num_classes) float32 in eval mode (running statistics), through
        the forward engine."""
        from ddscore_jax.forward import LoadedModel, ZooForward

        net = LoadedModel("trained", self.config, model.to_state_dict(state), blocks=0,
                          head="logits")
        return ZooForward([net]).run(np.asarray(x, np.float32), batch_size)[0]["logits"]

    def accuracy(self, state: nnx.State, x: np.ndarray, y: np.ndarray,
                 batch_size: int = 64) -> float:
        """Fraction of (x, y) the network classifies right (eval mode)."""
        return float(np.mean(np.argmax(self.logits(state, x, batch_size), axis=1) == y))
