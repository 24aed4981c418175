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

Writing (:func:`add`) is one writer at a time (``lock.exclusive`` on ``.ddscore-jax.lock``) and
all-or-nothing at every instant, ``kill -9`` included: each new checkpoint is saved under a
temporary name and renamed to a folder no ``zoo.json`` names yet, then ``zoo.json`` is replaced
atomically (the commit point), and only then are the checkpoints it stopped naming removed. A
crash leaves the old ``zoo.json`` with its checkpoints intact, or the new one with its own; what it
leaves besides is swept by the next writer, which holds the lock and so knows no one else is
writing. ``zoo.json`` is re-read under the lock, so two ``convert`` at once both land.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flax import traverse_util

from ddscore_jax import interrupts, lock, model
from ddscore_jax.atomic import fault_point, make_folder, write_json_atomic
from ddscore_jax.errors import InputError
from ddscore_jax.model import ImportedModel, ResNetConfig

ZOO_FILE = "zoo.json"
CHECKPOINTS = "checkpoints"
FORMAT = 2  # 1 (no "format" key): BatchNorm folded, ResNet18/34 only
LOCK_FILE = ".ddscore-jax.lock"
# A model name is also a file name (``checkpoints/<name>``, ``extract``'s ``<name>.npz``): no
# separators, no leading '.' or '-'. Checked when written, and again when read (zoo.json is
# editable by hand).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
NAME_RULE = "letters, digits, '.', '_', '-'; not starting with '.' or '-'"
log = logging.getLogger(__name__)


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
        entries = [ZooEntry.from_json(m) for m in doc["models"]]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a valid zoo.json ({e})") from None
    seen = set()
    for e in entries:
        if not isinstance(e.name, str) or not NAME.match(e.name):
            raise InputError(f"{path}: {e.name!r} is not a usable model name ({NAME_RULE})")
        if e.name in seen:
            raise InputError(f"{path}: the name {e.name!r} appears twice")
        if e.arch != e.config.name:
            # The display name is derived from the config (convert writes config.name); an edit
            # of one without the other would print a wrong architecture in every table.
            raise InputError(f"{path}: model {e.name!r} has arch {e.arch!r} but its config is "
                             f"a {e.config.name}; fix arch, or convert the model again")
        seen.add(e.name)
        ckpt = e.checkpoint if isinstance(e.checkpoint, str) else ""
        if not ckpt or os.path.isabs(ckpt) or ".." in Path(ckpt).parts:
            raise InputError(f"{path}: checkpoint {e.checkpoint!r} of model {e.name!r} must be a "
                             "path inside the zoo folder")
    return entries


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


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def _restore(zoo: str | os.PathLike, entry: ZooEntry) -> dict:
    path = (Path(zoo) / entry.checkpoint).resolve()  # Orbax wants absolute paths
    if not path.is_dir():
        if entry not in read(zoo, allow_missing=True):
            # A writer replaced the model and removed its old checkpoint after we read zoo.json.
            raise InputError(f"{Path(zoo) / ZOO_FILE}: model {entry.name!r} was replaced while "
                             "this command ran; run it again")
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
    model under an existing name is an InputError unless ``overwrite``. Models that other processes
    add meanwhile are kept: ``zoo.json`` is read, merged and written under the zoo's lock.
    """
    zoo = Path(zoo).resolve()
    names = [a.name for a in additions]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"{zoo}: several sources would get the name {dupes[0]!r}")
    try:
        make_folder(zoo)
    except FileExistsError:
        raise InputError(f"{zoo}: not a folder") from None
    with lock.exclusive(zoo / LOCK_FILE, f"zoo {zoo}"):
        _sweep(zoo)
        try:
            written = _add_locked(zoo, read(zoo, allow_missing=True), additions, overwrite)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                e.add_note(f"nothing was added to {zoo}")
            _sweep_settled(zoo)  # our own temporaries, right away
            raise
        # Committed. The obsolete checkpoints go now; a crash before this ends leaves them, and
        # the journal naming them, to the next sweep.
        _sweep(zoo, quiet=True)
        return written


# Written before the first checkpoint is placed, removed once the update is complete: the folders
# an update creates or makes obsolete, so a sweep removes exactly those zoo.json does not name.
PENDING = ".ddscore-jax.pending"
_TEMPORARY = re.compile(r"^\.[A-Za-z0-9][A-Za-z0-9._-]*\.[0-9a-f]{8}\.(tmp|old)")


def _add_locked(zoo: Path, current: list[ZooEntry], additions: list[Addition],
                overwrite: bool) -> list[str]:
    entries = {e.name: e for e in current}
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

    _check_space(zoo, todo)
    folder = zoo / CHECKPOINTS
    folder.mkdir(exist_ok=True)
    token = uuid.uuid4().hex[:8]
    # Final folders no zoo.json has named: until the commit, the old zoo.json and its checkpoints
    # stay intact. The plain name when it is free, else one with the update's token.
    finals = {}
    for a in todo:
        taken = (folder / a.name).exists() or any(e.checkpoint == f"{CHECKPOINTS}/{a.name}"
                                                  for e in current)
        finals[a.name] = folder / (f"{a.name}~{token}" if taken else a.name)
    obsolete = [entries[a.name].checkpoint for a in todo if a.name in entries]
    write_json_atomic(zoo / PENDING, {
        "placed": [f"{CHECKPOINTS}/{f.name}" for f in finals.values()], "obsolete": obsolete},
        step="pending")
    ckpt = _checkpointer()
    try:
        for a in todo:
            tmp = folder / f".{a.name}.{token}.tmp"
            tree = traverse_util.unflatten_dict(
                {k: np.asarray(v, np.float32) for k, v in a.model.state_dict.items()}, sep=".")
            # Orbax finishes in background threads: a Ctrl-C waits for them rather than leave
            # them writing while the interpreter shuts down.
            with interrupts.deferred("the checkpoint being written"):
                ckpt.save(tmp, tree)
                fault_point("convert:saving")
                ckpt.wait_until_finished()
            fault_point("convert:saved")
            tmp.rename(finals[a.name])
            fault_point("convert:placed")
    finally:
        # A failed save (a full disk) raises from the first write that failed while the others
        # and Orbax's commit thread still run: close() waits for them, so the sweep that follows
        # removes the temporary folder for good instead of racing with writers recreating it.
        with interrupts.deferred("the checkpoint writer stopping"), \
                contextlib.suppress(Exception):
            ckpt.close()
    for a in todo:
        entries[a.name] = ZooEntry(a.name, a.model.arch, a.model.config,
                                   os.path.relpath(a.source, zoo), a.source_format, a.sha256,
                                   f"{CHECKPOINTS}/{finals[a.name].name}")
    # The commit point; an interrupt waits for it so that "nothing was added" stays true.
    with interrupts.deferred("zoo.json being written"):
        write_json_atomic(zoo / ZOO_FILE, {"format": FORMAT,
                                           "models": [e.to_json() for e in entries.values()]},
                          step="zoo.json")
    return [a.name for a in todo]


def _check_space(zoo: Path, todo: list[Addition]) -> None:
    """InputError when the checkpoints cannot fit in the free space of the zoo's file system: a
    save that would surely fail is not started (a failing one leaves Orbax writing for a while
    after its error)."""
    need = sum(np.asarray(v).size * 4 for a in todo for v in a.model.state_dict.values())
    try:
        free = shutil.disk_usage(zoo).free
    except OSError:
        return
    if need > free:
        raise InputError(f"{zoo}: no space left on the device for {', '.join(a.name for a in todo)}"
                         f" ({need / 1e6:.1f} MB needed, {free / 1e6:.1f} MB free; free some "
                         "space or choose another location)")


def _sweep_settled(zoo: Path, rounds: int = 50, pause: float = 0.1) -> None:
    """Sweep after a failed update until nothing reappears: tensorstore's writes that were in
    flight when the first one failed (a full disk) may still create files in the temporary
    checkpoint after Orbax has raised and been closed. Stops after two quiet rounds (or
    ``rounds``)."""
    quiet = 0
    for _ in range(rounds):
        quiet = quiet + 1 if _sweep(zoo, quiet=True) == 0 else 0
        if quiet >= 2:
            return
        time.sleep(pause)


def _sweep(zoo: Path, *, quiet: bool = False) -> int:
    """Remove what interrupted writers left in the zoo: temporaries, and the folders the journal
    names that ``zoo.json`` does not. Call with the zoo's lock held: no live writer exists then,
    so all of it is stale."""
    removed = []
    folder = zoo / CHECKPOINTS
    pending = zoo / PENDING
    if pending.is_file():
        try:
            journal = json.loads(pending.read_text())
            listed = [*journal["placed"], *journal["obsolete"]]
        except (ValueError, KeyError, TypeError):
            listed = []  # a torn journal cannot exist (written atomically); nothing to trust
        referenced = {e.checkpoint for e in read(zoo, allow_missing=True)}
        for rel in listed:
            p = zoo / rel
            if rel not in referenced and p.parent == folder and p.is_dir():
                shutil.rmtree(p)
                removed.append(p.name)
        pending.unlink()
    for p in folder.iterdir() if folder.is_dir() else ():
        if _TEMPORARY.match(p.name):
            # ignore_errors: a failed save's last writes may still be landing in it (see
            # _sweep_settled); what they leave is removed by the next round.
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() \
                else p.unlink(missing_ok=True)
            removed.append(p.name)
    if folder.is_dir() and not any(folder.iterdir()):
        with contextlib.suppress(OSError):
            folder.rmdir()  # made by an update that placed nothing (a full disk)
    for pattern in (f".{ZOO_FILE}.*.tmp", f".{PENDING}.*.tmp"):
        for p in zoo.glob(pattern):
            p.unlink()
            removed.append(p.name)
    if removed and not quiet:
        log.warning("%s: removed %d leftover(s) of an interrupted convert (%s)", zoo,
                    len(removed), ", ".join(sorted(removed)[:3]) + (", ..." if len(removed) > 3
                                                                   else ""))
    return len(removed)
