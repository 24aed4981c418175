"""Ground truth for the ranking: fine-tune every zoo model on the target, measure held-out accuracy.

Protocol (docs/finetune.md has the reasons):

- Data. ``DATA`` must hold ``train/`` and ``valid/`` (class sub-folders, the same classes). Every
  model is fine-tuned on ``train/`` and tested once, at the end, on ``valid/``: the held-out split.
  The scores to evaluate against these accuracies must come from ``DATA/train`` only (``rank ZOO
  DATA/train``), so that no metric sees a held-out image.
- Network. The whole imported ResNet (conv1 to ``layer4``) plus a new zero-initialised linear
  classifier with one output per target class. A zoo model without ``layer4`` (a backbone-only
  checkpoint) gets a fresh seeded ``layer4``; the results say which models had one.
- Training. Softmax cross-entropy, AdamW (or SGD with momentum), gradients clipped to a global
  norm, cosine decay of the learning rate
  to zero over the run (or constant), every model on the same seeded sequence of batches, no
  augmentation unless ``flip`` (random horizontal flips). No early stopping and no model selection
  on ``valid/``: the accuracy reported is that of the last step.
- BatchNorm is folded into the convolutions before training (:func:`ddscore_jax.model.fold`),
  so it is frozen: its statistics stay the source's (as with detectron2's FrozenBatchNorm2d).

Results are a JSON file rewritten atomically after every model, so an interrupted run keeps what
it finished, and a model already in the file with the same checkpoint, data and settings is
skipped the next time.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ddscore_jax import cache, data, model, zoo
from ddscore_jax.errors import InputError
from ddscore_jax.extract import LoadedModel, ZooForward
from ddscore_jax.model import ResNetConfig

Progress = Callable[[str, int, int], None]
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
RESULTS_KIND = "ddscore-jax finetune results"
RESULTS_VERSION = 1
HELD_OUT = "valid"
TRAIN = "train"


@dataclass(frozen=True)
class Settings:
    """Everything that changes a fine-tuned accuracy. A result is reused only if all match."""

    image_size: int = 64
    batch_size: int = 32
    epochs: float = 10.0
    optimizer: str = "adamw"
    learning_rate: float = 3e-4
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    # Without BatchNorm nothing bounds the gradients through the imported weights; on the
    # benchmark zoo SGD without this clip diverged at 0.1 and learned nothing at 0.01.
    clip_norm: float = 1.0
    flip: bool = False
    seed: int = 0

    def check(self) -> None:
        """InputError naming the first bad option."""
        if self.image_size < 32:
            raise InputError(f"--image-size must be at least 32 (5 stride-2 steps), "
                             f"got {self.image_size}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.epochs > 0:
            raise InputError(f"--epochs must be positive, got {self.epochs}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, "
                             f"got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"--schedule must be one of {', '.join(SCHEDULES)}, "
                             f"got {self.schedule!r}")
        if not self.learning_rate > 0:
            raise InputError(f"--learning-rate must be positive, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise InputError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.clip_norm < 0:
            raise InputError(f"--clip-norm must be at least 0 (0: no clipping), "
                             f"got {self.clip_norm}")
        if self.weight_decay < 0:
            raise InputError(f"--weight-decay must be at least 0, got {self.weight_decay}")


# ---------------------------------------------------------------------------------------------
# Training one network: pure functions over the nnx.split state, jitted once per architecture.


def _direction(settings: Settings) -> optax.GradientTransformation:
    # The update before the learning rate: the rate is an argument of the step, computed on the
    # host, so one compiled step serves every run length (and the persistent cache can reuse it).
    clip = [optax.clip_by_global_norm(settings.clip_norm)] if settings.clip_norm else []
    if settings.optimizer == "sgd":
        # L2 decay joins the gradient before momentum, as torch.optim.SGD's weight_decay does.
        return optax.chain(*clip, optax.add_decayed_weights(settings.weight_decay),
                           optax.trace(decay=settings.momentum))
    return optax.chain(*clip, optax.scale_by_adam(),
                       optax.add_decayed_weights(settings.weight_decay))


def schedule_length(settings: Settings, n: int) -> tuple[int, int]:
    """``(batch, steps)`` for ``n`` training images: the batch is clipped to n, and the steps
    make ``settings.epochs`` passes over the data (at least one step)."""
    batch = min(settings.batch_size, n)
    return batch, max(1, math.ceil(settings.epochs * n / batch))


def learning_rate(settings: Settings, step: int, total: int) -> float:
    """The learning rate of ``step`` (0-based) of ``total``: cosine decay to 0, or constant."""
    if settings.schedule == "constant":
        return settings.learning_rate
    return settings.learning_rate * 0.5 * (1.0 + math.cos(math.pi * step / total))


def network(imported, num_classes: int, *, seed: int = 0,
            keep_fc: bool = False) -> tuple[ResNetConfig, nnx.State, bool]:
    """The network to fine-tune from a zoo model (:class:`ImportedModel`): ``(config, state,
    layer4_pretrained)``.

    BatchNorm folded (frozen). ``layer4`` is the source's when it has one, otherwise fresh
    (:func:`ddscore_jax.model.init_state_dict`, seeded, each block's last conv zeroed so that a
    fresh stage starts as its shortcuts and passes the pre-trained features on). The classifier is
    new and zero (big_vision's fine-tuning default: the first steps move the head, not the
    pre-trained weights by random gradients) unless ``keep_fc``, which keeps the source's
    (``num_classes`` must match). ValueError naming the parameters that do not fit.
    """
    config, sd = model.fold(imported.config, imported.state_dict)
    full = config.with_classifier(num_classes)
    pretrained = bool(config.depths[3])
    params = model.init_state_dict(full, seed, zero_init_residual=True)
    params.update({k: v for k, v in sd.items() if not k.startswith("fc.")})
    if keep_fc:
        if config.num_classes != num_classes:
            raise ValueError(f"the classifier has {config.num_classes} classes, not {num_classes}")
        params.update({k: v for k, v in sd.items() if k.startswith("fc.")})
    else:
        params["fc.weight"] = np.zeros_like(params["fc.weight"])
        params["fc.bias"] = np.zeros_like(params["fc.bias"])
    return full, model.from_state_dict(params, full), pretrained


class Trainer:
    """One compiled train step for a (config, settings) pair; evaluation through the forward
    engine (:class:`ddscore_jax.extract.ZooForward`)."""

    def __init__(self, config: ResNetConfig, settings: Settings):
        self.config = config
        self.graphdef = model.graphdef(config)
        self.settings = settings
        self.tx = _direction(settings)
        self._step = jax.jit(partial(_train_step, self.graphdef, self.tx, settings.flip),
                             donate_argnums=(0, 1))

    def train(self, state: nnx.State, x: np.ndarray, y: np.ndarray, *,
              on_step: Callable[[int, int, float], None] | None = None,
              steps: int | None = None, seed: int | None = None,
              ) -> tuple[nnx.State, float]:
        """Train ``state`` on inputs (n, S, S, 3) and labels (n,); return (state, last loss).

        :func:`schedule_length` gives the batch and the number of steps (``steps`` overrides
        the latter). Batches are drawn from consecutive permutations seeded by ``seed`` (default
        the settings'), so every image is seen once before any is seen twice, and the sequence
        is the same for every model.
        """
        s = self.settings
        n = len(x)
        batch, total = schedule_length(s, n)
        total = total if steps is None else steps
        seed = s.seed if seed is None else seed
        rng = np.random.default_rng(seed)
        flip_key = jax.random.key(seed)
        # The caller's state is not ours to donate.
        state = jax.tree.map(jnp.array, state)
        opt_state = self.tx.init(state)
        order = np.empty(0, dtype=np.int64)
        loss = float("nan")
        losses = []
        for i in range(total):
            while len(order) < batch:
                order = np.concatenate([order, rng.permutation(n)])
            idx, order = order[:batch], order[batch:]
            state, opt_state, loss_i = self._step(
                state, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx], jnp.int32),
                jnp.float32(learning_rate(s, i, total)), jax.random.fold_in(flip_key, i))
            losses.append(loss_i)
            if on_step is not None:
                on_step(i + 1, total, float(loss_i))
        if losses:
            # The mean over the last pass's worth of steps: one batch's loss is too noisy.
            tail = losses[-max(1, math.ceil(n / batch)):]
            loss = float(np.mean([float(v) for v in tail]))
        return state, loss

    def logits(self, state: nnx.State, x: np.ndarray, batch_size: int) -> np.ndarray:
        """(n, S, S, 3) -> (n, num_classes) float32, in padded batches (one compiled shape)."""
        net = LoadedModel("fine-tuned", self.config, model.to_state_dict(state), blocks=0,
                          head="logits")
        return ZooForward([net]).run(np.asarray(x, np.float32), batch_size)[0]["logits"]

    def accuracy(self, state: nnx.State, x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
        """Fraction of (x, y) the network classifies right."""
        return float(np.mean(np.argmax(self.logits(state, x, batch_size), axis=1) == y))


def _train_step(graphdef, tx, flip: bool, state, opt_state, x, y, lr, key):
    if flip:
        mirror = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
        x = jnp.where(mirror, x[:, :, ::-1, :], x)

    def loss_fn(p):
        logits = nnx.merge(graphdef, p).logits(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state)
    direction, opt_state = tx.update(grads, opt_state, state)
    state = jax.tree.map(lambda p, d: p - lr * d, state, direction)
    return state, opt_state, loss


# ---------------------------------------------------------------------------------------------
# The command: every zoo model on DATA/train, tested on DATA/valid, results resumable.


@dataclass(frozen=True)
class Split:
    """``DATA/train`` and ``DATA/valid`` as two data sets with the same classes."""

    root: Path
    train: data.Dataset
    held_out: data.Dataset


def scan_split(data_root: str | os.PathLike) -> Split:
    """Index ``DATA/train`` and ``DATA/valid``; InputError if either is missing or they differ."""
    root = Path(data_root)
    if not root.is_dir():
        raise InputError(f"{root}: data folder does not exist")
    for part in (TRAIN, HELD_OUT):
        if not (root / part).is_dir():
            raise InputError(f"{root}: fine-tuning needs {TRAIN}/ and {HELD_OUT}/ sub-folders "
                             f"(no {part}/); {HELD_OUT}/ is the held-out test split, and scores "
                             f"to evaluate must come from {TRAIN}/ alone")
    train, held = data.scan(root / TRAIN), data.scan(root / HELD_OUT)
    if train.classes != held.classes:
        raise InputError(f"{root / HELD_OUT}: classes {list(held.classes)} differ from those of "
                         f"{root / TRAIN} {list(train.classes)}")
    return Split(root, train, held)


def _load_all(dataset: data.Dataset, image_size: int, what: str,
              progress: Progress | None) -> np.ndarray:
    from ddscore_jax import pipeline

    out = np.empty((len(dataset), image_size, image_size, 3), np.float32)
    for batch in pipeline.iter_batches(dataset, image_size, 64):
        out[batch.start:batch.stop] = batch.images[:batch.stop - batch.start]
        if progress:
            progress(f"loading {what} images", batch.stop, len(dataset))
    return out


def read_results(path: str | os.PathLike) -> dict:
    """A results file as a dict (an empty one if ``path`` does not exist). InputError if bad."""
    path = Path(path)
    if not path.exists():
        return {"kind": RESULTS_KIND, "version": RESULTS_VERSION, "models": []}
    try:
        doc = json.loads(path.read_text())
        if doc.get("kind") != RESULTS_KIND or not isinstance(doc.get("models"), list):
            raise ValueError("not a fine-tuning results file")
    except (OSError, ValueError, AttributeError) as e:
        raise InputError(f"{path}: cannot reuse as a results file ({e})") from None
    return doc


def finetune(zoo_dir: str | os.PathLike, data_root: str | os.PathLike,
             results: str | os.PathLike, settings: Settings = Settings(), *,
             progress: Progress | None = None) -> dict:
    """Fine-tune every model of ``zoo_dir`` on ``DATA/train``; test on ``DATA/valid``.

    Writes (and returns) the results document: ``{"kind", "version", "dataset", "settings",
    "models": [{"name", "arch", "sha256", "held_out_accuracy", "n_held_out", "correct",
    "final_train_loss", "layer4", "steps", "seconds", "settings", "train_fingerprint",
    "held_out_fingerprint"}]}`` in zoo order, after each model. Models already there with the same
    checkpoint, data and settings are kept, not recomputed; entries of models not in this zoo are
    kept too.
    """
    settings.check()
    results = Path(results)
    if not results.parent.is_dir():
        raise InputError(f"{results}: folder {results.parent} does not exist")
    doc = read_results(results)
    split = scan_split(data_root)
    entries = zoo.read_nonempty(zoo_dir)
    train_fp = cache.dataset_fingerprint(split.train)
    held_fp = cache.dataset_fingerprint(split.held_out)
    wanted = asdict(settings)

    def done(entry: zoo.ZooEntry) -> bool:
        return any(m.get("name") == entry.name and m.get("sha256") == entry.sha256
                   and m.get("settings") == wanted and m.get("train_fingerprint") == train_fp
                   and m.get("held_out_fingerprint") == held_fp for m in doc["models"])

    doc.update({
        "dataset": {"root": str(split.root.resolve()),
                    "train": {"root": str((split.root / TRAIN).resolve()),
                              "n_images": len(split.train)},
                    "held_out": {"root": str((split.root / HELD_OUT).resolve()),
                                 "n_images": len(split.held_out)},
                    "classes": list(split.train.classes)},
        "settings": wanted,
    })
    todo = [e for e in entries if not done(e)]
    if not todo:
        return doc

    cache.enable_compilation_cache()
    x_train = _load_all(split.train, settings.image_size, "training", progress)
    x_held = _load_all(split.held_out, settings.image_size, "held-out", progress)
    y_train, y_held = split.train.labels, split.held_out.labels
    trainers: dict[ResNetConfig, Trainer] = {}
    for k, entry in enumerate(todo):
        try:
            config, state, pretrained = network(zoo.load_model(zoo_dir, entry),
                                                len(split.train.classes), seed=settings.seed)
        except ValueError as e:
            raise InputError(f"{Path(zoo_dir) / entry.checkpoint}: {e}") from None
        if config not in trainers:
            trainers[config] = Trainer(config, settings)
        trainer = trainers[config]
        description = f"fine-tuning {entry.name} ({k + 1}/{len(todo)})"
        started = time.monotonic()

        def on_step(i: int, total: int, _loss: float, description: str = description) -> None:
            if progress:
                progress(description, i, total)

        state, loss = trainer.train(state, x_train, y_train, on_step=on_step)
        pred = np.argmax(trainer.logits(state, x_held, min(settings.batch_size, 256)), axis=1)
        correct = int(np.sum(pred == y_held))
        record = {
            "name": entry.name, "arch": entry.arch, "sha256": entry.sha256,
            "held_out_accuracy": correct / len(y_held), "n_held_out": len(y_held),
            "correct": correct, "final_train_loss": loss,
            "layer4": "pretrained" if pretrained else "fresh",
            "steps": schedule_length(settings, len(y_train))[1],
            "seconds": round(time.monotonic() - started, 2),
            "settings": wanted, "train_fingerprint": train_fp, "held_out_fingerprint": held_fp,
        }
        doc["models"] = [m for m in doc["models"] if m.get("name") != entry.name] + [record]
        order = {e.name: i for i, e in enumerate(entries)}
        doc["models"].sort(key=lambda m: order.get(m.get("name"), len(order)))
        zoo.write_json_atomic(results, doc)
    return doc
