"""Feature cache: a second ``rank`` on the same models and images reuses the features.

A cache entry is keyed by the model checkpoint's hash, the checkpoint folder it was loaded from
(its path in the zoo and its files' sizes and times), the data set's content (relative paths,
labels, classes, file sizes and modification times) and every setting that changes the features
(image size, forward dtype, the engine that ran the forward), so a changed image or setting misses
exactly the entries it affects.

Integrity. Each entry records what it was made from (those settings) and a SHA-256 of its arrays;
:meth:`Entry.load` recomputes, and says so on stderr, an entry that is unreadable, was made from
anything else (another model's entry copied in its place) or whose values changed after it was
written (a valid ``.npz`` with new values). Entries are written atomically, by one process at a
time (:meth:`Entry.writing`, a lock per entry); :func:`sweep` removes what killed writers left.

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
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddscore_jax import data, lock
from ddscore_jax.atomic import atomic_path
from ddscore_jax.errors import InputError

log = logging.getLogger(__name__)

# Bump when preprocessing or the forward changes numerically: old entries then miss.
# 2: model.conv_op (layer3 on maps smaller than its kernel, below 48 px, moved ~1e-7).
FEATURES_VERSION = 2


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
        # surrogateescape: a file name that is not valid UTF-8 hashes as its raw bytes.
        h.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode(
            "utf-8", "surrogateescape"))
    return h.hexdigest()


def checkpoint_fingerprint(zoo_dir: str | os.PathLike, checkpoint: str) -> str:
    """Which checkpoint a zoo entry loads: its path in the zoo and its files' sizes and times.

    Two entries with one source hash but different checkpoints (an edited zoo.json) get different
    cache entries, and so does a checkpoint folder replaced in place."""
    root = Path(zoo_dir) / checkpoint
    h = hashlib.sha256(f"{checkpoint}\n".encode())
    for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root) if p != root else ''}\0{st.st_size}\0"
                     f"{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def entry_path(cache_dir: Path, model_sha256: str, data_fingerprint: str, image_size: int,
               dtype: str = "float32", checkpoint: str = "", engine: str = "jax") -> Path:
    """``cache_dir/<key>.npz``: the key hashes everything the model's features depend on
    (``checkpoint``: :func:`checkpoint_fingerprint`; ``engine``: the one that ran, never
    "auto"). The engines agree to float32 rounding, not bit for bit, so features from one are
    never served as the other's: ``rank --engine jax`` scores the JAX engine's features even
    after an onnxruntime run filled the cache."""
    setting = f"{image_size}|{dtype}|{engine}"
    if checkpoint:
        setting += f"|{checkpoint}"
    key = hashlib.sha256(
        f"v{FEATURES_VERSION}|{model_sha256}|{data_fingerprint}|{setting}".encode()
    ).hexdigest()[:32]
    return cache_dir / f"{key}.npz"


def feature_settings(zoo_dir: str | os.PathLike, model, data_fingerprint: str, image_size: int,
                     dtype: str = "float32", engine: str = "jax") -> dict:
    """What one model's features are made from: the record a cache entry and an ``extract``
    feature file carry (``RECORD``). ``model`` is a ``zoo.ZooEntry`` of ``zoo_dir``; ``engine`` the
    resolved one (``ort_engine.resolve``), not "auto"."""
    if engine == "auto":
        raise ValueError("record the engine that runs, not 'auto'")
    return {"version": FEATURES_VERSION, "model_sha256": model.sha256,
            "checkpoint": checkpoint_fingerprint(zoo_dir, model.checkpoint),
            "data": data_fingerprint, "image_size": image_size, "dtype": dtype, "engine": engine}


# The array of a feature file (cache entry or ``extract`` output) holding its record: the
# settings above and a SHA-256 of its other arrays, as JSON.
RECORD = "cache_meta"


def write_features(path: Path, features: Mapping[str, np.ndarray], dataset: data.Dataset,
                   settings: dict, *, step: str = "features") -> None:
    """Write a feature file atomically (docs/interface.md): the blocks' features, ``labels``,
    ``paths``, ``classes`` and the record of ``settings`` (:func:`feature_settings`)."""
    arrays = {b: np.asarray(v, np.float32) for b, v in features.items()}
    arrays["labels"] = np.asarray(dataset.labels, np.int64)
    arrays["paths"] = np.array(dataset.paths, dtype=str)
    arrays["classes"] = np.array(dataset.classes, dtype=str)
    record = {"settings": settings, "content_sha256": content_hash(arrays)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, step=step) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays, **{RECORD: np.array(json.dumps(record, sort_keys=True))})


def read_record(arrays: dict[str, np.ndarray]) -> tuple[dict, str]:
    """Pop the record from a feature file's arrays: ``(settings, content_sha256)``. KeyError when
    it has none (written by a ddscore-jax before records), ValueError when it is not JSON."""
    record = json.loads(str(arrays.pop(RECORD)))
    return record["settings"], record["content_sha256"]


LOCKS = ".locks"  # the entries' lock files, kept apart from the entries
_KEY = re.compile(r"^\.?([0-9a-f]{32})\.")


def content_hash(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of named arrays: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _differences(recorded: Mapping, expected: Mapping) -> str:
    keys = sorted(k for k in {*recorded, *expected} if recorded.get(k) != expected.get(k))
    return ", ".join(keys)


@dataclass(frozen=True)
class Entry:
    """One cache entry: the features of one model checkpoint on one data set with one setting.

    ``settings`` is everything the features were made from; it is recorded in the entry and must
    match exactly when the entry is read back.
    """

    path: Path
    settings: dict

    @classmethod
    def of(cls, cache_dir: str | os.PathLike, zoo_dir: str | os.PathLike, model,
           data_fingerprint: str, image_size: int, dtype: str = "float32",
           engine: str = "jax") -> Entry:
        """The entry of ``model`` (a ``zoo.ZooEntry`` of ``zoo_dir``) on the data set with
        ``data_fingerprint`` (:func:`dataset_fingerprint`) at these settings; ``engine`` is the
        resolved one (``ort_engine.resolve``), not "auto"."""
        settings = feature_settings(zoo_dir, model, data_fingerprint, image_size, dtype, engine)
        return cls(entry_path(Path(cache_dir), model.sha256, data_fingerprint, image_size, dtype,
                              settings["checkpoint"], engine), settings)

    @property
    def partial(self) -> PartialFeatures:
        """Where an unfinished extraction of this entry keeps its rows."""
        return PartialFeatures(partial_path(self.path), self.settings)

    @property
    def lock_file(self) -> Path:
        return self.path.parent / LOCKS / f"{self.path.stem}.lock"

    def load(self, name: str, n: int, blocks: Sequence[str], *,
             quiet: bool = False) -> dict[str, np.ndarray] | None:
        """``{block: (n, d)}`` when the entry exists and is intact, else None. An entry that exists
        but cannot be trusted is reported on stderr (naming model ``name``; not when ``quiet``)
        and recomputed."""
        if not self.path.is_file():
            return None
        reason = self._check(n, blocks)
        if isinstance(reason, dict):
            return reason
        if not quiet:
            log.warning("%s: cached features of model %r %s; recomputing them", self.path,
                        name, reason)
        return None

    def _check(self, n: int, blocks: Sequence[str]) -> dict[str, np.ndarray] | str:
        try:
            with np.load(self.path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            recorded, digest = read_record(arrays)
        except KeyError:
            return "carry no record of what they were made from"
        except Exception as e:  # noqa: BLE001 - zipfile/numpy/json raise many types
            return f"are unreadable ({type(e).__name__}: {e})"
        if recorded != self.settings:
            return ("were made from something else (differs in "
                    f"{_differences(recorded, self.settings)})")
        if content_hash(arrays) != digest:
            return "changed after they were written (their content hash does not match)"
        if any(b not in arrays or arrays[b].ndim != 2 or arrays[b].shape[0] != n
               for b in blocks):
            return f"do not hold {n} rows of {', '.join(blocks)}"
        return {b: arrays[b] for b in blocks}

    def save(self, features: Mapping[str, np.ndarray], dataset: data.Dataset) -> None:
        """Write the entry atomically: a feature file (``extract``'s format, record included)."""
        write_features(self.path, features, dataset, self.settings, step="cache-entry")

    @staticmethod
    @contextmanager
    def writing(entries: Sequence[Entry]) -> Iterator[None]:
        """Hold the write lock of every entry (in one global order, so two processes wanting
        overlapping sets cannot deadlock) for the block."""
        with ExitStack() as stack:
            for lock_file in sorted({e.lock_file for e in entries}):
                try:
                    lock_file.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise InputError(f"{lock_file.parent.parent}: cannot write the feature "
                                     f"cache here ({e.strerror}); use --cache-dir or --no-cache"
                                     ) from None
                stack.enter_context(lock.exclusive(lock_file, f"cache entry {lock_file.stem}"))
            yield


def sweep(cache_dir: str | os.PathLike) -> None:
    """Remove what killed writers left in ``cache_dir``: temporaries of entries and of their
    partial rows, and partial rows of entries that were completed. Each is removed only while
    its entry's lock is free, i.e. while no live process writes it."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return
    stale: dict[str, list[Path]] = {}
    for p in cache_dir.iterdir():
        m = _KEY.match(p.name)
        if not m:
            continue
        key = m.group(1)
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            stale.setdefault(key, []).append(p)
        elif p.name.endswith(".partial") and p.is_dir():
            if (cache_dir / (p.name.removesuffix(".partial") + ".npz")).is_file():
                stale.setdefault(key, []).append(p)  # completed: the rows were moved on
            else:
                stale.setdefault(key, []).extend(p.glob(".*.tmp"))
    removed = 0
    for key, paths in stale.items():
        if not paths:
            continue
        try:
            (cache_dir / LOCKS).mkdir(exist_ok=True)
        except OSError:
            return  # a cache we cannot write: nothing there we could remove
        with lock.if_free(cache_dir / LOCKS / f"{key}.lock") as free:
            if not free:
                continue
            for p in paths:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed += 1
    if removed:
        log.warning("%s: removed %d leftover(s) of an interrupted run", cache_dir, removed)


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

    def __init__(self, folder: Path, settings: dict | None = None):
        self.folder = Path(folder)
        # When given, each chunk records these and its content hash, and a chunk that does not
        # match them ends the prefix (it is recomputed).
        self.settings = settings

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
                    if self.settings is not None:
                        record = json.loads(str(z["cache_meta"]))
                        arrays = {k: z[k] for k in z.files if k != "cache_meta"}
            except Exception:  # noqa: BLE001 - any unreadable chunk is simply recomputed
                break
            if self.settings is not None and (record.get("settings") != self.settings or
                                              record.get("content_sha256") !=
                                              content_hash(arrays)):
                log.warning("%s: saved rows do not match their record; recomputing them", path)
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
        arrays = {b: np.asarray(v, np.float32) for b, v in features.items()}
        if self.settings is not None:
            record = {"settings": self.settings, "content_sha256": content_hash(arrays)}
            arrays["cache_meta"] = np.array(json.dumps(record, sort_keys=True))
        with atomic_path(chunk, step="cache-chunk") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

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
        with tempfile.TemporaryFile(dir=folder):  # a read-only mount still lets mkdir succeed
            pass
    except OSError:
        return None  # an unwritable cache folder costs compile time, never the run
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # JAX's defaults skip programs that compile in under a second and small entries; ours compile
    # in seconds on CPU and every one of them is worth keeping.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return folder
