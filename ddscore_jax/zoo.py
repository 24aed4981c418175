"""The model zoo on disk: one Orbax checkpoint per model plus ``zoo.json`` (docs/interface.md).

``zoo.json``: ``{"format": 2, "models": [{"name", "arch", "config", "source", "source_format",
"sha256", "checkpoint"}]}`` with ``checkpoint`` relative to the zoo folder, ``arch`` the display
name and ``config`` the :class:`ddscore_jax.model.ResNetConfig` read from the checkpoint's tensors.
Each checkpoint holds the model's canonical state dict (its own parameters, BatchNorm unfolded,
``fc`` included; see :mod:`ddscore_jax.model`), nested at the dots.

A zoo of the first format (``zoo.json`` without ``format``: BatchNorm folded into HWIO kernels,
``params``/``head`` trees) is refused with the command that rebuilds it from its sources in a new
folder; it is not migrated, since its checkpoints no longer hold the BatchNorm parameters the new
format keeps (fine-tuning would silently lose them).

Adding models is all-or-nothing: checkpoints are written under temporary names, renamed into
place, and ``zoo.json`` is replaced atomically last; on any failure the zoo is left exactly as it
was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flax import traverse_util

from ddscore_jax import model
from ddscore_jax.atomic import atomic_path
from ddscore_jax.converters._common import ImportedModel
from ddscore_jax.errors import InputError
from ddscore_jax.model import ResNetConfig

ZOO_FILE = "zoo.json"
CHECKPOINTS = "checkpoints"
FORMAT = 2  # 1 (no "format" key): BatchNorm folded, ResNet18/34 only


@dataclass(frozen=True)
class ZooEntry:
    name: str
    arch: str  # display name, e.g. "resnet50"
    config: ResNetConfig
    source: str
    source_format: str
    sha256: str
    checkpoint: str

    def to_json(self) -> dict:
        return {"name": self.name, "arch": self.arch, "config": self.config.to_json(),
                "source": self.source, "source_format": self.source_format,
                "sha256": self.sha256, "checkpoint": self.checkpoint}

    @classmethod
    def from_json(cls, doc: dict) -> ZooEntry:
        return cls(**{**doc, "config": ResNetConfig.from_json(doc["config"])})


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
        fmt = doc.get("format", 1) if isinstance(doc, dict) else None
    except ValueError as e:
        raise InputError(f"{path}: not a valid zoo.json ({e})") from None
    if fmt == 1 and doc.get("models") == []:
        return []  # an empty zoo of the first format holds nothing to rebuild
    if fmt == 1 and isinstance(doc.get("models"), list):
        raise InputError(f"{path}: zoo of an older ddscore-jax (BatchNorm folded, no config); "
                         f"rebuild it in a new folder: {_rebuild_command(zoo, doc['models'])}")
    if fmt != FORMAT:
        raise InputError(f"{path}: not a valid zoo.json (format {fmt!r}, this ddscore-jax "
                         f"reads format {FORMAT})")
    try:
        return [ZooEntry.from_json(m) for m in doc["models"]]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a valid zoo.json ({e})") from None


def _rebuild_command(zoo: str | os.PathLike, models: list) -> str:
    sources = list(dict.fromkeys(
        str((Path(zoo) / m["source"]).resolve()) for m in models
        if isinstance(m, dict) and isinstance(m.get("source"), str)))
    shown = " ".join(sources[:4]) + (" ..." if len(sources) > 4 else "")
    return f"ddscore-jax convert {shown or 'SRC...'} --zoo NEW_ZOO"


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


def _restore(zoo: str | os.PathLike, entry: ZooEntry) -> dict:
    path = (Path(zoo) / entry.checkpoint).resolve()  # Orbax wants absolute paths
    if not path.is_dir():
        raise InputError(f"{path}: checkpoint of model {entry.name!r} is missing")
    try:
        return _checkpointer().restore(path)
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for a bad folder
        raise InputError(f"{path}: unreadable checkpoint of model {entry.name!r} ({e})") from None


def load_state_dict(zoo: str | os.PathLike, entry: ZooEntry) -> dict[str, np.ndarray]:
    """One zoo model's canonical state dict (see :mod:`ddscore_jax.model`), checked against its
    config; InputError naming the checkpoint when it does not fit."""
    sd = {k: np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(_restore(zoo, entry), sep=".").items()}
    try:
        model.check_state_dict(sd, entry.config)
    except ValueError as e:
        raise InputError(f"{(Path(zoo) / entry.checkpoint).resolve()}: {e}") from None
    return sd


def load_model(zoo: str | os.PathLike, entry: ZooEntry) -> ImportedModel:
    """One zoo model: its config and canonical state dict."""
    return ImportedModel(entry.config, load_state_dict(zoo, entry))


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
        if old and old.sha256 == a.sha256 and old.config == a.model.config:
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
            tree = traverse_util.unflatten_dict(
                {k: np.asarray(v, np.float32) for k, v in a.model.state_dict.items()}, sep=".")
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
            entries[a.name] = ZooEntry(a.name, a.model.arch, a.model.config,
                                       os.path.relpath(a.source, zoo), a.source_format,
                                       a.sha256, f"{CHECKPOINTS}/{a.name}")
        write_json_atomic(zoo / ZOO_FILE, {"format": FORMAT,
                                           "models": [e.to_json() for e in entries.values()]})
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
