"""The built-in demo: a small zoo and a target set made from data that ships inside packages.

Nothing is downloaded. Three whole ResNet18s (BatchNorm included) are pre-trained briefly by the
one trainer (:mod:`ddscore_jax.train`) on data bundled with scikit-learn and scikit-image
(:mod:`ddscore_jax.sources`), and a fourth is left at its random initialisation as a control:

- ``resnet18_digits``: scikit-learn's ``load_digits`` (8x8 handwritten digits, 10 classes);
- ``resnet18_textures``: random crops of scikit-image's bundled grayscale images (brick, grass,
  gravel, camera, coins, moon, text, page, clock, cell), one class per image, taken from the top
  part of each image only;
- ``resnet18_faces``: scikit-image's ``lfw_subset`` (100 faces, 100 non-faces);
- ``resnet18_random``: initialised as torchvision does, never trained.

The target is a defect-like surface inspection task: crops from the held-out bottom part of the
brick image, ``clean`` or with a synthetic ``scratch`` or ``spot``, written as PNG files in
folder-of-classes layout. The texture model has seen brick (other pixels of it) and should rank
first. Everything runs at :data:`DEMO_IMAGE_SIZE`, which the ranking must use too.

:func:`prepare_demo` builds all of it under a cache folder once; a marker written last makes an
interrupted build start over instead of being reused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from flax import nnx
from PIL import Image

from ddscore_jax import atomic, cache, model, sources, train, zoo
from ddscore_jax.errors import InputError
from ddscore_jax.model import ImportedModel
from ddscore_jax.progress import Progress

DEMO_IMAGE_SIZE = 32
# Bump when anything that changes the zoo or the target changes: an older cache is then rebuilt.
# 2: the zoo keeps the canonical state dict (zoo format 2). 3: whole ResNet18s with BatchNorm,
# pre-trained by the one trainer (ddscore_jax.train) from torchvision's init.
DEMO_VERSION = 3
ARCH = "resnet18"
# The pre-trained network: a whole ResNet18 with BatchNorm, one output per class of the widest task.
# Every pre-training task gets its 10 outputs (the largest task has 10 classes), so all three
# models share one compiled train step; the unused logits of smaller tasks learn to stay low.
PRETRAIN = dataclasses.replace(model.CONFIGS["resnet18"], num_classes=10)
ZOO_DIR = "zoo"
DATA_DIR = "target"
MARKER = "demo.json"
# Written when a folder becomes a demo cache and never removed: a rebuild deletes ``zoo`` and
# ``target`` only in a folder that has it, never in a user's folder that happens to hold them.
OWNER = ".ddscore-jax-demo"

SEED = 0
# One surface only: with several, the surface type dominates every model's features and hides the
# defects, and the ranking says more about the mix of surfaces than about the models.
TARGET_SURFACE = "brick"
TARGET_PER_CLASS = 40
TASK_SOURCES = {
    "digits": "scikit-learn load_digits(): 8x8 handwritten digits",
    "textures": f"scikit-image bundled images {', '.join(sources.TEXTURES)}: random "
                f"{sources.CROP}x{sources.CROP} crops of the top {sources.TRAIN_ROWS:.0%} of rows, "
                "one class per image",
    "faces": "scikit-image lfw_subset(): 25x25, 100 faces and 100 non-faces",
}

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
    learning_rate: float = 1e-3


def default_cache_dir() -> Path:
    """``demo`` in the tool's cache root (:func:`ddscore_jax.cache.cache_root`:
    ``$DDSCORE_JAX_CACHE``, else ``$XDG_CACHE_HOME/ddscore-jax``, else ``~/.cache/ddscore-jax``)."""
    return cache.cache_root() / "demo"


# ---------------------------------------------------------------------------------------------
# Source and target images (ddscore_jax.sources), as uint8 grayscale arrays.


def digits_task() -> sources.Labelled:
    """scikit-learn's 1797 handwritten digits (8x8), 10 classes."""
    return sources.digits("all")


def textures_task(per_class: int = 200, seed: int = SEED) -> sources.Labelled:
    """Random crops of each bundled texture's training rows (:func:`sources.picture_crops`); one
    class per image."""
    return sources.picture_crops("textures", sources.TEXTURES, "source", per_class, seed=seed)


def faces_task() -> sources.Labelled:
    """scikit-image's ``lfw_subset``: 200 images 25x25, the first 100 faces, the rest not."""
    return sources.faces("all")


def target_images(per_class: int = TARGET_PER_CLASS, seed: int = SEED) -> sources.Labelled:
    """``clean`` / ``scratch`` / ``spot`` crops (:data:`sources.DEFECT_CLASSES`) of the held-out
    brick rows."""
    surface = sources.rows(sources.picture(TARGET_SURFACE), "target")
    return sources.defects([surface], per_class, np.random.default_rng(seed + 1))


def write_target(folder: Path, per_class: int = TARGET_PER_CLASS, seed: int = SEED) -> None:
    """Write :func:`target_images` as ``folder/<class>/<class>_NNN.png``."""
    task = target_images(per_class, seed)
    for c, cls in enumerate(task.classes):
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(task.images[task.labels == c]):
            Image.fromarray(img, mode="L").save(folder / cls / f"{cls}_{i:03d}.png")


# ---------------------------------------------------------------------------------------------
# Pre-training (ddscore_jax.train): a whole ResNet18 with BatchNorm, from torchvision's init.


def init_state(seed: int) -> nnx.State:
    """A fresh pre-training network, initialised as torchvision does (seeded)."""
    return model.from_state_dict(model.init_state_dict(PRETRAIN, seed), PRETRAIN)


def trainer(config: DemoConfig) -> train.Trainer:
    """The demo's pre-training: Adam(W) at ``config.learning_rate``, constant, no decay."""
    return train.Trainer(PRETRAIN, train.Recipe(
        batch_size=config.batch_size, optimizer="adamw", learning_rate=config.learning_rate,
        weight_decay=0.0, schedule="constant"))


def split_task(task: sources.Labelled, test_fraction: float = 0.2,
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
    atomic.make_folder(cache_dir)
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
        atomic.write_json_atomic(cache_dir / MARKER, _marker_doc(config))
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
    pretrain = trainer(config)
    recipes = zoo_dir / "sources"
    recipes.mkdir(parents=True)
    additions = []
    for k, task in enumerate(tasks):
        name = f"{ARCH}_{task.name}"
        description = f"pre-training {name}"
        steps = config.train_steps[task.name]
        report(description, 0, steps)
        train_idx, _ = split_task(task)
        x = sources.to_inputs(task.images[train_idx], DEMO_IMAGE_SIZE)
        state, _ = pretrain.train(init_state(SEED + k), x, task.labels[train_idx], steps,
                                  seed=SEED + k,
                                  on_step=lambda i, t, d=description: report(d, i, t))
        recipe = {"data": TASK_SOURCES[task.name], "classes": list(task.classes),
                  "train_images": len(train_idx), "image_size": DEMO_IMAGE_SIZE,
                  "steps": steps, "batch_size": config.batch_size,
                  "optimizer": f"adam, learning rate {config.learning_rate}, constant",
                  "init": f"torchvision's (NumPy seed {SEED + k})",
                  "head": f"fc with {PRETRAIN.num_classes} outputs (classes beyond the task's "
                          "unused)"}
        additions.append(_addition(name, recipes, recipe, model.to_state_dict(state)))

    control_seed = SEED + len(tasks)
    additions.append(_addition(
        f"{ARCH}_random", recipes,
        {"data": None, "init": f"torchvision's (NumPy seed {control_seed}), never trained"},
        model.init_state_dict(PRETRAIN, control_seed)))
    report("writing the demo zoo", 0, 1)
    zoo.add(zoo_dir, additions)
    report("writing the demo zoo", 1, 1)
    report("writing the demo target set", 0, 1)
    write_target(data_dir)
    report("writing the demo target set", 1, 1)


def _addition(name: str, recipes: Path, recipe: dict,
              state_dict: dict[str, np.ndarray]) -> zoo.Addition:
    # The zoo records a source file per model; for a demo model that is a small JSON file inside
    # the zoo saying how it was made (the zoo stores it relative to itself, so it moves along).
    source = recipes / f"{name}.json"
    atomic.write_json_atomic(source, {"model": name, "arch": ARCH, **recipe})
    return zoo.Addition(name=name, source=source, source_format="demo",
                        sha256=sources.params_digest(state_dict),
                        model=ImportedModel(PRETRAIN, state_dict))
