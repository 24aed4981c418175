"""Batched conv4_x feature extraction for a whole zoo.

Models of one architecture share one compiled program. Where the backend runs a vmapped
convolution well (GPU, TPU) their parameters are stacked and vmapped, so one call runs every model
on a batch; on CPU, XLA lowers a vmapped convolution to a grouped one, which measures slower than
running the same compiled single-model program once per model, so there we loop. Both are behind
:func:`forward_zoo`. The last, ragged batch is padded to the batch size so a data set of any size
compiles once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ddscore_jax import data, model
from ddscore_jax.errors import InputError

Progress = Callable[[str, int, int], None]  # (description, completed, total)
SCORE_BLOCKS = ("layer3.0", "layer3.1")


@dataclass(frozen=True)
class LoadedModel:
    name: str
    arch: str
    params: dict[str, np.ndarray]  # flat backbone tree (see ddscore_jax.model)


def default_strategy(backend: str | None = None) -> str:
    """``"loop"`` on CPU (vmapped convolutions lower to slow grouped ones), ``"vmap"`` elsewhere."""
    return "loop" if (backend or jax.default_backend()) == "cpu" else "vmap"


@partial(jax.jit, static_argnames=("arch", "num_blocks"))
def _forward_one(state, images, arch: str, num_blocks: int):
    return model.forward(arch, state, images, num_blocks)


@partial(jax.jit, static_argnames=("arch", "num_blocks"))
def _forward_stacked(stacked, images, arch: str, num_blocks: int):
    return jax.vmap(lambda s: model.forward(arch, s, images, num_blocks))(stacked)


class ZooForward:
    """Runs every model of a zoo on a batch of images; one compiled program per architecture."""

    def __init__(self, models: Sequence[LoadedModel], num_blocks: int = 2,
                 strategy: str | None = None):
        self.num_blocks = num_blocks
        self.strategy = strategy or default_strategy()
        self.groups: dict[str, list[int]] = {}
        for i, m in enumerate(models):
            self.groups.setdefault(m.arch, []).append(i)
        self.n_models = len(models)
        states = [model.flat_to_state(m.params, m.arch) for m in models]
        if self.strategy == "vmap":
            self.params = {arch: jax.tree.map(lambda *xs: jnp.stack(xs), *[states[i] for i in idx])
                           for arch, idx in self.groups.items()}
        else:
            self.params = {arch: [states[i] for i in idx] for arch, idx in self.groups.items()}

    def __call__(self, images: np.ndarray) -> list[dict[str, np.ndarray]]:
        """``images`` (B, S, S, 3) -> per model (in input order) ``{"layer3.i": (B, 256)}``."""
        out: list[dict[str, np.ndarray]] = [{} for _ in range(self.n_models)]
        x = jnp.asarray(images)
        for arch, idx in self.groups.items():
            if self.strategy == "vmap":
                feats = _forward_stacked(self.params[arch], x, arch, self.num_blocks)
                for j, i in enumerate(idx):
                    out[i] = {k: np.asarray(v[j]) for k, v in feats.items()}
            else:
                for state, i in zip(self.params[arch], idx, strict=True):
                    feats = _forward_one(state, x, arch, self.num_blocks)
                    out[i] = {k: np.asarray(v) for k, v in feats.items()}
        return out


def extract_features(
    models: Sequence[LoadedModel],
    dataset: data.Dataset,
    *,
    batch_size: int = 32,
    image_size: int = 224,
    blocks: Sequence[str] = SCORE_BLOCKS,
    progress: Progress | None = None,
) -> list[dict[str, np.ndarray]]:
    """Features of every model on every image: per model ``{block: (n, 256) float32}``."""
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    n = len(dataset)
    forward = ZooForward(models, num_blocks=len(blocks))
    feats = [{b: np.empty((n, model.FEATURE_DIM), np.float32) for b in blocks} for _ in models]
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = data.load_batch(dataset, range(start, stop), image_size)
        if stop - start < batch_size:  # pad: one compiled shape for every batch
            pad = np.zeros((batch_size - (stop - start), *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])
        for out, result in zip(feats, forward(batch), strict=True):
            for b in blocks:
                out[b][start:stop] = result[b][: stop - start]
        if progress:
            progress("extracting features", stop, n)
    return feats


def save_features(path: Path, feats: dict[str, np.ndarray], dataset: data.Dataset) -> None:
    """Write ``<model>.npz`` (SPEC 2) atomically: the file appears whole or not at all."""
    arrays = {b: np.asarray(v, np.float32) for b, v in feats.items()}
    arrays["labels"] = np.asarray(dataset.labels, np.int64)
    arrays["paths"] = np.array(dataset.paths, dtype=str)
    arrays["classes"] = np.array(dataset.classes, dtype=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class FeatureFile:
    name: str
    features: dict[str, np.ndarray]
    labels: np.ndarray
    paths: np.ndarray
    classes: np.ndarray


def load_features(path: Path, blocks: Sequence[str] = SCORE_BLOCKS) -> FeatureFile:
    """Read and check one feature file. InputError names the file and what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - zipfile/numpy raise many types for a bad file
        raise InputError(f"{path}: unreadable feature file ({e})") from None
    missing = [k for k in (*blocks, "labels", "paths", "classes") if k not in arrays]
    if missing:
        raise InputError(f"{path}: feature file lacks {', '.join(missing)}")
    n = len(arrays["labels"])
    for b in blocks:
        if arrays[b].ndim != 2 or arrays[b].shape[0] != n:
            raise InputError(f"{path}: {b} has shape {arrays[b].shape}, expected ({n}, d)")
    return FeatureFile(path.stem, {b: arrays[b] for b in blocks}, arrays["labels"],
                       arrays["paths"], arrays["classes"])
