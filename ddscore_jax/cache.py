"""Feature cache: a second ``rank`` on the same models and images reuses the features.

A cache entry is keyed by the model checkpoint's hash, the data set's content (relative paths,
labels, classes, file sizes and modification times) and every setting that changes the pixels, so
a changed image or setting misses exactly the entries it affects. Entries are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ddscore_jax import data

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


def entry_path(cache_dir: Path, model_sha256: str, data_fingerprint: str, image_size: int) -> Path:
    key = hashlib.sha256(
        f"v{FEATURES_VERSION}|{model_sha256}|{data_fingerprint}|{image_size}".encode()
    ).hexdigest()[:32]
    return cache_dir / f"{key}.npz"
