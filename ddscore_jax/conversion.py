"""``convert``: checkpoints -> zoo entries, each checkpoint on its own.

A source is a checkpoint file, a model folder (a hub snapshot: one model, named after the folder),
a folder of checkpoints (each file, and each model folder, directly inside it), or the Hugging
Face cache (:mod:`ddscore_jax.converters.hub_cache`): its root (each model repository that holds a
ResNet; the others are skipped with a line each), a repository folder ``models--org--name`` (the
snapshot ``refs/main`` names) or a repo id ``org/name`` found in it. Every checkpoint
is read, checked and added to the zoo whole or not at all; one that is refused is reported in one
line and does not stop the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddscore_jax import cache, data, model, zoo
from ddscore_jax.converters import (
    SUFFIXES,
    checkpoint_stem,
    hub_cache,
    is_model_folder,
    load_source,
)
from ddscore_jax.converters.files import HUB_CONFIG, checkpoint_suffix, model_folder_weights
from ddscore_jax.errors import InputError
from ddscore_jax.model import ImportedModel
from ddscore_jax.progress import Progress

log = logging.getLogger(__name__)

# In a folder of checkpoints a bare ".tar" is more often a data archive than a checkpoint.
_FOLDER_SKIPS = (".tar",)


@dataclass
class ConvertResult:
    """What ``convert`` did: models written, models already there unchanged, and one line per
    refused checkpoint (naming the file and the reason)."""

    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    # Repositories of a Hugging Face cache root that hold no ResNet this tool reads: one line each.
    skipped: list[str] = field(default_factory=list)


@dataclass
class Expanded:
    """The checkpoints of some sources: ``lenient`` ones (a cache root's repositories) are
    skipped with a line where they cannot be imported, not refused; ``skipped``: those lines."""

    paths: list[Path] = field(default_factory=list)
    lenient: set[Path] = field(default_factory=set)
    skipped: list[str] = field(default_factory=list)


def expand(sources: Sequence[str | os.PathLike]) -> Expanded:
    """Checkpoints to convert: each file as given, a model folder as itself, a folder of
    checkpoints as the checkpoint files and model folders directly inside it, and the Hugging
    Face cache as its snapshots. A source that does not exist is kept, to be refused on its own.
    InputError for a folder with no checkpoints, a cache with no ResNet, and a repo id that cannot
    be found."""
    out = Expanded()
    for given in sources:
        src = Path(given)
        if not src.exists() and hub_cache.looks_like_repo_id(str(given)):
            out.paths.append(hub_cache.resolve_repo_id(str(given)))
        elif hub_cache.is_repo_folder(src):
            out.paths.append(hub_cache.snapshot(src))
        elif src.is_dir() and not is_model_folder(src) and hub_cache.is_cache_root(src):
            entries = hub_cache.scan(src)
            found = [e.path for e in entries if e.path is not None]
            if not found:
                raise InputError(f"{src}: Hugging Face cache holds no ResNet ({len(entries)} "
                                 "model repositories, none a ResNet this tool reads)")
            out.paths += found
            out.lenient.update(found)
            out.skipped += [e.skipped for e in entries if e.skipped]
        elif src.is_dir() and not is_model_folder(src):
            inside = sorted(p for p in src.iterdir() if not p.name.startswith(".") and (
                is_model_folder(p) if p.is_dir()
                else checkpoint_suffix(p) not in (None, *_FOLDER_SKIPS)))
            if not inside:
                raise InputError(f"{src}: folder has no checkpoints ({', '.join(SUFFIXES)}, "
                                 f"or model folders with {HUB_CONFIG})")
            out.paths += inside
        else:
            out.paths.append(src)
    return out


def source_sha256(path: Path) -> str:
    """SHA-256 of a checkpoint file; for a model folder, of its config and weights files."""
    if not path.is_dir():
        return zoo.sha256_file(path)
    weights = model_folder_weights(path)
    files = [path / HUB_CONFIG, weights]
    if weights.name.endswith(".index.json"):
        try:
            shards = json.loads(weights.read_text())["weight_map"].values()
            files += sorted({path / Path(s).name for s in shards})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{weights}: not a sharded-checkpoint index ({e})") from None
    h = hashlib.sha256()
    for f in files:
        if not f.is_file():
            raise InputError(f"{f}: missing from model folder {path}")
        h.update(f"{f.name}\0{zoo.sha256_file(f)}\n".encode())
    return h.hexdigest()


def convert_sources(sources: Sequence[str | os.PathLike], zoo_dir: str | os.PathLike, *,
                    name: str | None = None, overwrite: bool = False,
                    progress: Progress | None = None) -> ConvertResult:
    """Import every checkpoint of ``sources`` into ``zoo_dir``, each whole or not at all.

    Usage errors (``name`` with several checkpoints, two checkpoints that would get one name, an
    empty folder) raise InputError before anything is written; a checkpoint that cannot be
    imported is listed in ``refused`` and the others are still added.
    """
    # Orbax finds a checkpoint's parts by glob: under a folder whose path holds [ ] * ? it
    # writes a checkpoint it cannot read back. Refuse such a zoo before anything is written.
    wild = sorted(set("[]*?") & set(str(Path(zoo_dir).resolve())))
    if wild:
        raise InputError(f"{zoo_dir}: a zoo path cannot hold {' '.join(wild)} (Orbax, which "
                         "stores the checkpoints, reads them back by glob); choose another "
                         "folder")
    expanded = expand(sources)
    paths = expanded.paths
    if name is not None and len(paths) != 1:
        raise InputError(f"--name {name!r} needs exactly one source checkpoint, got {len(paths)}")
    names = [name if name is not None else checkpoint_stem(p) for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        clash = [str(p) for p, n in zip(paths, names, strict=True) if n == dupes[0]]
        raise InputError(f"{' and '.join(clash)}: several checkpoints would get the name "
                         f"{dupes[0]!r}; convert them one at a time with --name")
    # Read once up front: a zoo this version cannot extend stops the command before any file.
    known = {e.name: e.sha256 for e in zoo.read(zoo_dir, allow_missing=True)}
    cache.enable_compilation_cache()  # the probe forward (check_forward) compiles once per arch
    result = ConvertResult(skipped=list(expanded.skipped))
    for i, (path, model_name) in enumerate(zip(paths, names, strict=True)):
        try:
            result.written += _convert_one(path, model_name, zoo_dir, overwrite, known)
            if model_name not in result.written:
                result.unchanged.append(model_name)
        except InputError as e:
            line = " ".join(str(e).split())
            (result.skipped if path in expanded.lenient else result.refused).append(line)
        except KeyboardInterrupt as e:
            # Each model is added whole: say which ones made it before the interrupt.
            if result.written and not getattr(e, "__notes__", None):
                e.add_note(f"added to {zoo_dir} before the interrupt: "
                           f"{', '.join(result.written)}; the rest was not")
            raise
        if progress:
            progress("converting checkpoints", i + 1, len(paths))
    return result


def _convert_one(path: Path, model_name: str, zoo_dir: str | os.PathLike, overwrite: bool,
                 known: dict[str, str]) -> list[str]:
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if not zoo.NAME.match(model_name):
        raise InputError(f"{path}: {model_name!r} is not a usable model name ({zoo.NAME_RULE})")
    sha256 = source_sha256(path)
    if known.get(model_name) == sha256:
        return []  # the same bytes under the same name: already in the zoo, nothing to read
    loaded = load_source(path)
    if loaded.note:
        log.warning("%s", loaded.note)
    check_forward(path, loaded.model)
    addition = zoo.Addition(model_name, path.resolve(), loaded.source_format, sha256,
                            loaded.model)
    return zoo.add(zoo_dir, [addition], overwrite=overwrite)


PROBE_SIZE = 32  # the smallest image size a forward takes (settings.MIN_IMAGE_SIZE)


@partial(jax.jit, static_argnums=0)
def _finite_stages(config: model.ResNetConfig, state, images: jax.Array) -> list[jax.Array]:
    net = nnx.merge(model.graphdef(config), state)
    return [jnp.isfinite(out).all() for _, out in net.stages(images, len(model.SCORE_BLOCKS))]


def check_forward(path: Path, imported: ImportedModel) -> None:
    """InputError naming the first stage whose output is not finite on a probe batch: weights
    finite in the file that still overflow float32 in the forward (conv1 scaled by 1e38) can only
    give non-finite features, so they are refused at import, not at the first ``rank``.

    The probe is the inference network ``rank`` runs (BatchNorm folded, cut after conv4_x) on two
    seeded 32 px images of pixels uniform in [0, 1], ImageNet-normalised. One small program per
    architecture, kept in the persistent compilation cache: about a second per ResNet-50 once
    compiled (docs/interface.md has the figures).
    """
    folded, state = model.inference(imported.config, imported.state_dict, backbone=True)
    pixels = np.random.default_rng(0).random((2, PROBE_SIZE, PROBE_SIZE, 3), dtype=np.float32)
    flags = _finite_stages(folded, state, jnp.asarray((pixels - data.MEAN) / data.STD))
    names = model.ResNet.stage_names(folded, len(model.SCORE_BLOCKS))
    for stage, finite in zip(names, flags, strict=True):
        if not bool(finite):
            raise InputError(
                f"{path}: the forward overflows: {stage}'s output is not finite (NaN or "
                "infinity) on a probe image although every tensor is finite; the weights "
                "are broken (scaled?), and every feature of this model would be too")
