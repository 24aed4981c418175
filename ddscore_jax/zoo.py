"""The model zoo on disk: one Orbax checkpoint per model plus ``zoo.json`` (docs/interface.md).

``zoo.json``: ``{"models": [{"name", "arch", "source", "source_format", "sha256", "checkpoint"}]}``
with ``checkpoint`` relative to the zoo folder. Adding models is all-or-nothing: checkpoints are
written under temporary names, renamed into place, and ``zoo.json`` is replaced atomically last; on
any failure the zoo is left exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ddscore_jax.atomic import atomic_path
from ddscore_jax.converters._common import ImportedModel
from ddscore_jax.errors import InputError

ZOO_FILE = "zoo.json"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    arch: str
    source: str
    source_format: str
    sha256: str
    checkpoint: str


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read(zoo: str | os.PathLike, *, allow_missing: bool = False) -> list[ZooEntry]:
    """The entries of ``zoo/zoo.json``; InputError when it is missing (unless allowed) or bad."""
    path = Path(zoo) / ZOO_FILE
    if not path.exists():
        if allow_missing:
            return []
        raise InputError(f"{path}: no zoo here (create one with `ddscore-jax convert`)")
    try:
        doc = json.loads(path.read_text())
        return [ZooEntry(**m) for m in doc["models"]]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a valid zoo.json ({e})") from None


def read_nonempty(zoo: str | os.PathLike) -> list[ZooEntry]:
    entries = read(zoo)
    if not entries:
        raise InputError(f"{Path(zoo) / ZOO_FILE}: the zoo has no models")
    return entries


def write_json_atomic(path: Path, doc: object) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def _nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.asarray(value, dtype=np.float32)
    return tree


def _unnest(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_unnest(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = np.asarray(v)
    return flat


def _restore(zoo: str | os.PathLike, entry: ZooEntry) -> dict:
    path = (Path(zoo) / entry.checkpoint).resolve()  # Orbax wants absolute paths
    if not path.is_dir():
        raise InputError(f"{path}: checkpoint of model {entry.name!r} is missing")
    try:
        return _checkpointer().restore(path)
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for a bad folder
        raise InputError(f"{path}: unreadable checkpoint of model {entry.name!r} ({e})") from None


def load_params(zoo: str | os.PathLike, entry: ZooEntry) -> dict[str, np.ndarray]:
    """The backbone parameters of one zoo model, as the flat tree ``ddscore_jax.model`` takes."""
    return _unnest(_restore(zoo, entry)["params"])


def load_head(zoo: str | os.PathLike, entry: ZooEntry) -> dict[str, np.ndarray] | None:
    """The layers after conv4_x (flat ``layer4.*``, ``fc.kernel`` (in, out), ``fc.bias``) of one
    zoo model, or None when its source had none (a backbone-only checkpoint)."""
    tree = _restore(zoo, entry)
    return _unnest(tree["head"]) if tree.get("head") else None


@dataclass
class Addition:
    """A model to add: its name, where it came from, and the imported parameters."""

    name: str
    source: Path
    source_format: str
    sha256: str
    model: ImportedModel


def add(zoo: str | os.PathLike, additions: list[Addition], *, overwrite: bool = False) -> list[str]:
    """Add models to the zoo, all or nothing. Returns the names written (unchanged ones skipped).

    The same source file under the same name is a no-op (converting twice is idempotent); another
    model under an existing name is an InputError unless ``overwrite``.
    """
    zoo = Path(zoo).resolve()
    entries = {e.name: e for e in read(zoo, allow_missing=True)}
    names = [a.name for a in additions]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"{zoo}: several sources would get the name {dupes[0]!r}")
    todo = []
    for a in additions:
        old = entries.get(a.name)
        if old and old.sha256 == a.sha256 and old.arch == a.model.arch:
            continue
        if old and not overwrite:
            raise InputError(f"{a.source}: the zoo already has a different model named {a.name!r} "
                             "(use --overwrite or --name)")
        todo.append(a)
    if not todo:
        return []

    (zoo / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staged: list[tuple[Path, Path]] = []  # (temporary, final)
    placed: list[Path] = []  # finals renamed into place
    replaced: list[tuple[Path, Path]] = []  # (final, moved-aside copy of the old one)
    try:
        ckpt = _checkpointer()
        for a in todo:
            tmp = zoo / CHECKPOINTS / f".{a.name}.{token}.tmp"
            tree = {"params": _nest(a.model.params)}
            if a.model.head:
                tree["head"] = _nest(a.model.head)
            ckpt.save(tmp, tree)
            ckpt.wait_until_finished()
            staged.append((tmp, zoo / CHECKPOINTS / a.name))
        for tmp, final in staged:
            if final.exists():
                aside = final.with_name(f".{final.name}.{token}.old")
                final.rename(aside)
                replaced.append((final, aside))
            tmp.rename(final)
            placed.append(final)
        for a in todo:
            entries[a.name] = ZooEntry(a.name, a.model.arch, os.path.relpath(a.source, zoo),
                                       a.source_format,
                                       a.sha256, f"{CHECKPOINTS}/{a.name}")
        write_json_atomic(zoo / ZOO_FILE, {"models": [asdict(e) for e in entries.values()]})
    except BaseException:
        for tmp, _ in staged:
            shutil.rmtree(tmp, ignore_errors=True)
        for final in placed:
            shutil.rmtree(final, ignore_errors=True)
        for final, aside in replaced:
            aside.rename(final)
        raise
    for _, aside in replaced:
        shutil.rmtree(aside, ignore_errors=True)
    return [a.name for a in todo]
