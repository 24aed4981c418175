"""Feature cache: a second ``rank`` on the same models and images reuses the features.

A cache entry is keyed by the model checkpoint's hash, the data set's content (relative paths,
labels, classes, file sizes and modification times) and every setting that changes the features
(image size, forward dtype), so a changed image or setting misses exactly the entries it affects.
Entries are written atomically.

Beside a model's feature entry ``<key>.npz`` sits ``<key>.probabilities.npz``: its source
classifier's softmax on the same images (LEEP, NCE), same key, so a second ``rank --metric leep``
decodes nothing.

An extraction in progress keeps its finished batches beside the entry it will become
(:class:`PartialFeatures`), so an interrupted one resumes where it stopped. Compiled XLA programs
are cached too, under ``cache_root()/"jax"`` (:func:`enable_compilation_cache`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ddscore_jax import data
from ddscore_jax.atomic import atomic_path

# Bump when preprocessing or the forward changes numerically: old entries then miss.
FEATURES_VERSION = 1


def cache_root() -> Path:
    """``$DDSCORE_JAX_CACHE``, else ``$XDG_CACHE_HOME/ddscore-jax``, else ~/.cache/ddscore-jax."""
    if os.environ.get("DDSCORE_JAX_CACHE"):
        return Path(os.environ["DDSCORE_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddscore-jax"


def dataset_fingerprint(dataset: data.Dataset) -> str:
    """A hash of what the data set's features depend on: names, labels, sizes and mtimes."""
    h = hashlib.sha256()
    h.update(json.dumps(list(dataset.classes)).encode())
    for rel, label in zip(dataset.paths, dataset.labels.tolist(), strict=True):
        st = os.stat(dataset.root / rel)
        h.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def entry_path(cache_dir: Path, model_sha256: str, data_fingerprint: str, image_size: int,
               dtype: str = "float32") -> Path:
    """``cache_dir/<key>.npz``: the key hashes everything the model's features depend on."""
    # float32 keeps the key it had before --dtype existed, so those entries stay valid.
    setting = f"{image_size}" if dtype == "float32" else f"{image_size}|{dtype}"
    key = hashlib.sha256(
        f"v{FEATURES_VERSION}|{model_sha256}|{data_fingerprint}|{setting}".encode()
    ).hexdigest()[:32]
    return cache_dir / f"{key}.npz"


def probabilities_path(entry: Path) -> Path:
    """Where the source classifier's probabilities for feature entry ``entry`` are kept."""
    return entry.with_name(entry.stem + ".probabilities.npz")


def save_probabilities(path: Path, probabilities: np.ndarray) -> None:
    """Write ``{"probabilities": (n, Z) float32}`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, probabilities=np.asarray(probabilities, np.float32))


def load_probabilities(path: Path, n: int) -> np.ndarray | None:
    """The cached (n, Z) probabilities, or None when missing or damaged (then recomputed)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            p = z["probabilities"]
    except Exception:  # noqa: BLE001 - any unreadable entry is simply recomputed
        return None
    return p if p.ndim == 2 and p.shape[0] == n else None


def partial_path(entry: Path) -> Path:
    """The folder where the unfinished extraction of ``entry`` keeps its chunks."""
    return entry.with_name(entry.stem + ".partial")


_CHUNK = re.compile(r"^(\d{10})-(\d{10})\.npz$")


class PartialFeatures:
    """The finished part of one model's extraction: chunk files ``<start>-<stop>.npz`` in a folder.

    Chunks are appended, each written atomically, so saving progress costs the new rows only and a
    crash at any moment leaves a readable prefix. The folder sits beside the final entry and has
    the same key, so it only ever holds features of this model on this data with these settings.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def load(self, n: int, blocks: Sequence[str]) -> tuple[int, dict[str, np.ndarray]]:
        """``(done, {block: (done, d)})``: the contiguous rows ``0:done`` saved so far.

        A damaged or out-of-range chunk ends the prefix there; what follows is recomputed.
        """
        chunks = {}
        if self.folder.is_dir():
            for p in self.folder.iterdir():
                m = _CHUNK.match(p.name)
                if m:
                    chunks[int(m.group(1))] = (int(m.group(2)), p)
        done, parts = 0, []
        while done in chunks:
            stop, path = chunks[done]
            if not done < stop <= n:
                break
            try:
                with np.load(path, allow_pickle=False) as z:
                    part = {b: z[b] for b in blocks}
            except Exception:  # noqa: BLE001 - any unreadable chunk is simply recomputed
                break
            if any(v.ndim != 2 or v.shape[0] != stop - done for v in part.values()):
                break
            parts.append(part)
            done = stop
        if not parts:
            return 0, {}
        return done, {b: np.concatenate([p[b] for p in parts]) for b in blocks}

    def append(self, start: int, stop: int, features: dict[str, np.ndarray]) -> None:
        """Save rows ``start:stop`` (``features[block]`` has ``stop - start`` rows), atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        chunk = self.folder / f"{start:010d}-{stop:010d}.npz"
        with atomic_path(chunk) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{b: np.asarray(v, np.float32) for b, v in features.items()})

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def enable_compilation_cache(folder: Path | None = None) -> Path | None:
    """Persist compiled XLA programs in ``folder`` (default ``cache_root()/"jax"``), so that the
    next command loads the forward instead of compiling it again. Returns the folder in use.

    A cache folder the user already gave JAX (``JAX_COMPILATION_CACHE_DIR`` or jax.config) wins.
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    folder = Path(folder) if folder else cache_root() / "jax"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # an unwritable cache folder costs compile time, never the run
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # JAX's defaults skip programs that compile in under a second and small entries; ours compile
    # in seconds on CPU and every one of them is worth keeping.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return folder
