"""The built-in demo: a small zoo and a target set made from data that ships inside packages.

Nothing is downloaded. Three ResNet18s are pre-trained briefly with optax on data bundled with
scikit-learn and scikit-image, and a fourth is left at its random initialisation as a control:

- ``resnet18_digits``: scikit-learn's ``load_digits`` (8x8 handwritten digits, 10 classes);
- ``resnet18_textures``: random crops of scikit-image's bundled grayscale images (brick, grass,
  gravel, camera, coins, moon, text, page, clock, cell), one class per image, taken from the top
  part of each image only;
- ``resnet18_faces``: scikit-image's ``lfw_subset`` (100 faces, 100 non-faces);
- ``resnet18_random``: drawn from Flax's default initialisers, never trained.

The target is a defect-like surface inspection task: crops from the held-out bottom part of the
brick image, ``clean`` or with a synthetic ``scratch`` or ``spot``, written as PNG files in
folder-of-classes layout. The texture model has seen brick (other pixels of it) and should rank
first. Everything runs at :data:`DEMO_IMAGE_SIZE`, which the ranking must use too.

:func:`prepare_demo` builds all of it under a cache folder once; a marker written last makes an
interrupted build start over instead of being reused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

from ddscore_jax import model, zoo
from ddscore_jax.converters._common import ImportedModel
from ddscore_jax.data import MEAN, STD
from ddscore_jax.errors import InputError

DEMO_IMAGE_SIZE = 32
# Bump when anything that changes the zoo or the target changes: an older cache is then rebuilt.
# 2: the zoo keeps the canonical state dict (zoo format 2).
DEMO_VERSION = 2
ARCH = "resnet18"
# ResNet18 to conv4_x, trained without BatchNorm (conv biases instead).
BACKBONE = model.ResNetConfig("basic", (2, 2, 2, 0), batchnorm=False)
ZOO_DIR = "zoo"
DATA_DIR = "target"
MARKER = "demo.json"
# Written when a folder becomes a demo cache and never removed: a rebuild deletes ``zoo`` and
# ``target`` only in a folder that has it, never in a user's folder that happens to hold them.
OWNER = ".ddscore-jax-demo"

SEED = 0
# Every pre-training task gets a head this wide (the largest task has 10 classes), so all three
# models share one compiled train step; the unused logits of smaller tasks just learn to stay low.
HEAD_CLASSES = 10
CROP = 64  # texture crops, in source pixels, before resizing to DEMO_IMAGE_SIZE
# Rows above this fraction of each texture image feed pre-training, rows below it the target, so
# the target's pixels were never seen in training.
TRAIN_ROWS = 0.7
TEXTURES = ("brick", "grass", "gravel", "camera", "coins", "moon", "text", "page", "clock",
            "cell")
# One surface only: with several, the surface type dominates every model's features and hides the
# defects, and the ranking says more about the mix of surfaces than about the models.
TARGET_SURFACE = "brick"
TARGET_CLASSES = ("clean", "scratch", "spot")
TARGET_PER_CLASS = 40
TASK_SOURCES = {
    "digits": "scikit-learn load_digits(): 8x8 handwritten digits",
    "textures": f"scikit-image bundled images {', '.join(TEXTURES)}: random {CROP}x{CROP} crops "
                f"of the top {TRAIN_ROWS:.0%} of rows, one class per image",
    "faces": "scikit-image lfw_subset(): 25x25, 100 faces and 100 non-faces",
}

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DemoConfig:
    """How the demo zoo is pre-trained. The defaults are the demo; tests shrink ``train_steps``.

    The whole config is recorded in the cache marker, so a cache built with other settings is
    rebuilt rather than reused.
    """

    # Optimiser steps per source task. Few: the zoo only needs backbones that lean towards their
    # source data, and the first demo must finish in minutes on two CPU cores.
    train_steps: dict[str, int] = field(
        default_factory=lambda: {"digits": 30, "textures": 40, "faces": 20})
    batch_size: int = 32
    # Modest: with no BatchNorm, larger Adam steps make the loss jump in the first few steps.
    learning_rate: float = 1e-3


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ddscore-jax/demo``, or ``~/.cache/ddscore-jax/demo`` without it."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddscore-jax" / "demo"


# ---------------------------------------------------------------------------------------------
# Source and target images, as uint8 grayscale arrays.


@dataclass(frozen=True)
class Task:
    """A labelled pre-training set: ``images`` (n, h, w) uint8 grayscale, ``labels`` (n,) int."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]


def _texture_image(name: str) -> np.ndarray:
    from skimage import data as skdata

    img = getattr(skdata, name)()
    return img if img.ndim == 2 else np.asarray(Image.fromarray(img).convert("L"))


def _random_crops(image: np.ndarray, rows: slice, count: int,
                  rng: np.random.Generator) -> np.ndarray:
    region = image[rows]
    h, w = region.shape
    ys = rng.integers(0, h - CROP + 1, count)
    xs = rng.integers(0, w - CROP + 1, count)
    return np.stack([region[y:y + CROP, x:x + CROP] for y, x in zip(ys, xs, strict=True)])


def _split_rows(image: np.ndarray, part: str) -> slice:
    cut = int(TRAIN_ROWS * image.shape[0])
    return slice(0, cut) if part == "train" else slice(cut, None)


def digits_task() -> Task:
    """scikit-learn's 1797 handwritten digits (8x8), 10 classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    # Pixel values run 0..16.
    images = np.round(d.images * (255 / 16)).astype(np.uint8)
    return Task("digits", images, d.target.astype(np.int64), tuple(str(i) for i in range(10)))


def textures_task(per_class: int = 200, seed: int = SEED) -> Task:
    """Random CROP x CROP crops of each bundled image's training rows; one class per image."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(TEXTURES):
        img = _texture_image(name)
        images.append(_random_crops(img, _split_rows(img, "train"), per_class, rng))
        labels.append(np.full(per_class, label, dtype=np.int64))
    return Task("textures", np.concatenate(images), np.concatenate(labels), TEXTURES)


def faces_task() -> Task:
    """scikit-image's ``lfw_subset``: 200 images 25x25, the first 100 faces, the rest not."""
    from skimage import data as skdata

    images = np.round(skdata.lfw_subset() * 255).astype(np.uint8)
    labels = np.repeat(np.array([1, 0], dtype=np.int64), 100)
    return Task("faces", images, labels, ("non-face", "face"))


def _add_scratch(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # A thin straight mark across a good part of the crop, brighter or darker than its surface.
    out = crop.astype(np.float32)
    yy, xx = np.mgrid[0:CROP, 0:CROP].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0.3 * CROP, 0.7 * CROP, 2)
    half_len = rng.uniform(0.3, 0.5) * CROP
    width = rng.uniform(1.5, 2.5)
    dy, dx = np.sin(angle), np.cos(angle)
    along = (yy - cy) * dy + (xx - cx) * dx
    across = np.abs(-(yy - cy) * dx + (xx - cx) * dy)
    mask = np.clip(width - across, 0, 1) * (np.abs(along) <= half_len)
    value = 255.0 if rng.random() < 0.5 else 0.0
    return np.clip(out * (1 - mask) + value * mask, 0, 255).round().astype(np.uint8)


def _add_spot(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # A soft-edged blob, like a stain or a pit.
    out = crop.astype(np.float32)
    yy, xx = np.mgrid[0:CROP, 0:CROP].astype(np.float32)
    cy, cx = rng.uniform(0.25 * CROP, 0.75 * CROP, 2)
    ry, rx = rng.uniform(0.08, 0.16, 2) * CROP
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    mask = np.clip((1.0 - r) * 4, 0, 1)
    value = 255.0 if rng.random() < 0.5 else 0.0
    return np.clip(out * (1 - mask) + value * mask, 0, 255).round().astype(np.uint8)


def target_images(per_class: int = TARGET_PER_CLASS,
                  seed: int = SEED) -> dict[str, list[np.ndarray]]:
    """``{"clean" | "scratch" | "spot": [CROP x CROP uint8 images]}`` from held-out brick rows."""
    rng = np.random.default_rng(seed + 1)
    img = _texture_image(TARGET_SURFACE)
    rows = _split_rows(img, "target")
    out: dict[str, list[np.ndarray]] = {c: [] for c in TARGET_CLASSES}
    for cls in TARGET_CLASSES:
        for _ in range(per_class):
            crop = _random_crops(img, rows, 1, rng)[0]
            if cls == "scratch":
                crop = _add_scratch(crop, rng)
            elif cls == "spot":
                crop = _add_spot(crop, rng)
            out[cls].append(crop)
    return out


def write_target(folder: Path, per_class: int = TARGET_PER_CLASS, seed: int = SEED) -> None:
    """Write :func:`target_images` as ``folder/<class>/<class>_NNN.png``."""
    for cls, images in target_images(per_class, seed).items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            Image.fromarray(img, mode="L").save(folder / cls / f"{cls}_{i:03d}.png")


def to_inputs(images: np.ndarray, image_size: int = DEMO_IMAGE_SIZE) -> np.ndarray:
    """(n, h, w) uint8 grayscale -> (n, S, S, 3) float32, preprocessed as ``data.load_image`` does.

    Same steps (Pillow bilinear resize, /255, ImageNet normalisation), so pre-training sees what
    the ranking later sees from the PNG files.
    """
    resized = np.stack([
        np.asarray(Image.fromarray(img, mode="L").resize((image_size, image_size),
                                                         Image.BILINEAR))
        for img in images
    ])
    x = resized.astype(np.float32)[..., None] / np.float32(255)
    return (x - MEAN) / STD


# ---------------------------------------------------------------------------------------------
# Pre-training.


class _Classifier(nnx.Module):
    """The backbone plus a temporary linear head on the last conv4_x block, averaged over space."""

    def __init__(self, rngs: nnx.Rngs):
        self.backbone = model.ResNet(BACKBONE, rngs=rngs)
        self.head = nnx.Linear(BACKBONE.feature_dim, HEAD_CLASSES, rngs=rngs)
        self.last_block = model.block_names(BACKBONE)[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.backbone.features(x, stop_at=None)[self.last_block])


@functools.cache
def _classifier_abstract() -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: _Classifier(nnx.Rngs(0))))


def init_state(seed: int, zero_residual: bool = True) -> nnx.State:
    """A fresh :class:`_Classifier` state, drawn with NumPy from Flax's default distributions.

    Kernels: LeCun normal truncated at 2 standard deviations (Flax's ``lecun_normal``), biases
    zero. NumPy rather than ``nnx.Rngs``: JAX's generator compiles a program per parameter shape,
    which costs more CPU time (about 13 s) than pre-training a model here.

    ``zero_residual`` zeroes each residual block's conv2 kernel, as torchvision's
    ``zero_init_residual``: without BatchNorm nothing keeps activations in range at the start, and
    this way every block starts as its shortcut.
    """
    _, abstract = _classifier_abstract()
    rng = np.random.default_rng(seed)

    def draw(path, leaf) -> jax.Array:
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-1] == "bias" or (zero_residual and "conv2" in names):
            return jnp.asarray(np.zeros(leaf.shape, np.float32))
        fan_in = int(np.prod(leaf.shape[:-1]))
        # Flax divides by the std of a unit normal truncated to [-2, 2], restoring the variance.
        std = np.sqrt(1.0 / fan_in) / 0.87962566103423978
        z = rng.standard_normal(leaf.shape)
        while (bad := np.abs(z) > 2).any():
            z[bad] = rng.standard_normal(int(bad.sum()))
        return jnp.asarray((z * std).astype(np.float32))

    pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(abstract))
    state = jax.tree.map(lambda x: x, abstract)  # a copy: the cached abstract state stays abstract
    nnx.replace_by_pure_dict(state, pure)
    return state


@functools.cache
def _compiled(learning_rate: float):
    # Cached so that every model, and every build in one process, reuses one compiled train step
    # (compiling it costs seconds of the demo's budget).
    graphdef = _classifier_abstract()[0]
    tx = optax.adam(learning_rate)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def predict(params, x):
        return jnp.argmax(nnx.merge(graphdef, params)(x), axis=-1)

    return tx, step, predict


class Trainer:
    """Pre-trains :class:`_Classifier` s with Adam; all of them share one compiled train step."""

    def __init__(self, batch_size: int = 32, learning_rate: float = 1e-3):
        self.batch_size = batch_size
        self.tx, self._step, self._predict = _compiled(learning_rate)

    def train(self, x: np.ndarray, y: np.ndarray, steps: int, seed: int,
              on_step: Callable[[int, float], None] | None = None) -> nnx.State:
        """Train ``steps`` steps from :func:`init_state` (seed) on inputs (n, S, S, 3), labels (n,).

        Returns the classifier's state. Batches come from a seeded generator: a run repeats.
        ``on_step(step, loss)`` is called after each step.
        """
        params = init_state(seed)
        opt_state = self.tx.init(params)
        rng = np.random.default_rng(seed)
        order = np.empty(0, dtype=np.int64)
        for i in range(steps):
            # Epochs of shuffled indices, so every sample is used before any repeats.
            while len(order) < self.batch_size:
                order = np.concatenate([order, rng.permutation(len(x))])
            idx, order = order[:self.batch_size], order[self.batch_size:]
            params, opt_state, loss = self._step(params, opt_state, jnp.asarray(x[idx]),
                                                 jnp.asarray(y[idx], dtype=jnp.int32))
            if on_step is not None:
                on_step(i + 1, float(loss))
        return params

    def accuracy(self, params: nnx.State, x: np.ndarray, y: np.ndarray) -> float:
        """Fraction of (x, y) the trained classifier gets right."""
        pred = np.concatenate([np.asarray(self._predict(params, jnp.asarray(x[i:i + 256])))
                               for i in range(0, len(x), 256)])
        return float(np.mean(pred == y))


def backbone_flat(params: nnx.State) -> dict[str, np.ndarray]:
    """The backbone part of a classifier state as the zoo's flat tree (float32 numpy)."""
    return model.to_state_dict(params["backbone"])


def params_sha256(flat: dict[str, np.ndarray]) -> str:
    """A digest of the parameter names, shapes and float32 bytes, in sorted name order."""
    h = hashlib.sha256()
    for key in sorted(flat):
        value = np.ascontiguousarray(flat[key], dtype=np.float32)
        h.update(f"{key}:{value.shape}".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def split_task(task: Task, test_fraction: float = 0.2,
               seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train_indices, test_indices) of a task."""
    perm = np.random.default_rng(seed).permutation(len(task.labels))
    n_test = int(round(test_fraction * len(perm)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# ---------------------------------------------------------------------------------------------
# The cache.


def _marker_doc(config: DemoConfig) -> dict:
    return {"version": DEMO_VERSION, "image_size": DEMO_IMAGE_SIZE, "config": asdict(config)}


def is_ready(cache_dir: Path, config: DemoConfig | None = None) -> bool:
    """Whether ``cache_dir`` holds a complete demo of this version, built with ``config``."""
    try:
        doc = json.loads((Path(cache_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (doc == _marker_doc(config or DemoConfig())
            and (Path(cache_dir) / ZOO_DIR / zoo.ZOO_FILE).is_file()
            and (Path(cache_dir) / DATA_DIR).is_dir())


def _claim(cache_dir: Path) -> None:
    if (cache_dir / OWNER).is_file():
        return
    if cache_dir.exists() and (not cache_dir.is_dir() or any(cache_dir.iterdir())):
        raise InputError(f"{cache_dir}: not a ddscore-jax demo cache and not empty; "
                         "give a new or empty folder for the demo")
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / OWNER).write_text("ddscore-jax demo cache: zoo/ and target/ are rebuilt here\n")


def _remove_stale_builds(cache_dir: Path) -> None:
    # A build folder is named after the process that made it; one whose process is gone is the
    # leftover of a killed run. A live one belongs to a concurrent run and is left alone.
    for path in cache_dir.glob(".build-*"):
        try:
            pid = int(path.name.split("-")[1])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass


def prepare_demo(cache_dir: Path | None = None, progress: Progress | None = None, *,
                 config: DemoConfig | None = None) -> tuple[Path, Path]:
    """Build (or reuse) the demo zoo and target set; return ``(zoo_dir, data_dir)``.

    ``zoo_dir`` is a zoo of four ResNet18s (:mod:`ddscore_jax.zoo`), ``data_dir`` a folder of
    classes ``clean``, ``scratch``, ``spot`` of 64x64 grayscale PNGs; rank them at
    :data:`DEMO_IMAGE_SIZE`. ``cache_dir`` defaults to :func:`default_cache_dir`; it must be new,
    empty, or a demo cache already (InputError otherwise), since a rebuild replaces what is there.

    ``progress``, if given, is called as ``progress(description, completed, total)`` for each
    stage of the build (loading data, pre-training each model step by step, writing the zoo,
    writing the target set); it is not called when the cache is reused. Nothing is printed.
    """
    config = config or DemoConfig()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir = cache_dir.expanduser().resolve()
    zoo_dir, data_dir = cache_dir / ZOO_DIR, cache_dir / DATA_DIR
    if is_ready(cache_dir, config):
        return zoo_dir, data_dir

    _claim(cache_dir)
    (cache_dir / MARKER).unlink(missing_ok=True)
    _remove_stale_builds(cache_dir)
    build = cache_dir / f".build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    build.mkdir()
    try:
        _build(build / ZOO_DIR, build / DATA_DIR, config, progress)
        # Replacing the old folders and writing the marker are not one atomic step; the marker
        # goes last, so a run cut off in between leaves a cache that the next run rebuilds.
        for final in (zoo_dir, data_dir):
            if final.exists():
                shutil.rmtree(final)
            (build / final.name).rename(final)
        zoo.write_json_atomic(cache_dir / MARKER, _marker_doc(config))
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return zoo_dir, data_dir


def _build(zoo_dir: Path, data_dir: Path, config: DemoConfig,
           progress: Progress | None) -> None:
    def report(description: str, completed: int, total: int) -> None:
        if progress is not None:
            progress(description, completed, total)

    report("loading the demo's source data", 0, 1)
    tasks = [digits_task(), textures_task(), faces_task()]
    report("loading the demo's source data", 1, 1)
    trainer = Trainer(config.batch_size, config.learning_rate)
    sources = zoo_dir / "sources"
    sources.mkdir(parents=True)
    additions = []
    for k, task in enumerate(tasks):
        name = f"{ARCH}_{task.name}"
        description = f"pre-training {name}"
        steps = config.train_steps[task.name]
        report(description, 0, steps)
        train_idx, _ = split_task(task)
        params = trainer.train(to_inputs(task.images[train_idx]), task.labels[train_idx], steps,
                               seed=SEED + k,
                               on_step=lambda i, _loss, d=description, t=steps: report(d, i, t))
        recipe = {"data": TASK_SOURCES[task.name], "classes": list(task.classes),
                  "train_images": len(train_idx), "image_size": DEMO_IMAGE_SIZE,
                  "steps": steps, "batch_size": config.batch_size,
                  "optimizer": f"adam, learning rate {config.learning_rate}",
                  "init": f"Flax's default initialisers (NumPy seed {SEED + k}), "
                          "every conv2 zeroed",
                  "head": f"linear on the averaged {model.block_names(BACKBONE)[-1]}, not stored"}
        additions.append(_addition(name, sources, recipe, backbone_flat(params)))

    control_seed = SEED + len(tasks)
    control = model.to_state_dict(init_state(control_seed, zero_residual=False)["backbone"])
    additions.append(_addition(
        f"{ARCH}_random", sources,
        {"data": None,
         "init": f"Flax's default initialisers (NumPy seed {control_seed}), never trained"},
        {k: np.asarray(v, np.float32) for k, v in control.items()}))
    report("writing the demo zoo", 0, 1)
    zoo.add(zoo_dir, additions)
    report("writing the demo zoo", 1, 1)
    report("writing the demo target set", 0, 1)
    write_target(data_dir)
    report("writing the demo target set", 1, 1)


def _addition(name: str, sources: Path, recipe: dict,
              flat: dict[str, np.ndarray]) -> zoo.Addition:
    # The zoo records a source file per model; for a demo model that is a small JSON file inside
    # the zoo saying how it was made (the zoo stores it relative to itself, so it moves along).
    source = sources / f"{name}.json"
    zoo.write_json_atomic(source, {"model": name, "arch": ARCH, **recipe})
    return zoo.Addition(name=name, source=source, source_format="demo",
                        sha256=params_sha256(flat), model=ImportedModel(BACKBONE, flat))
