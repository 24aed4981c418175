"""``convert``: checkpoint files -> zoo entries, all or nothing."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ddscore_jax import zoo
from ddscore_jax.converters import SUFFIXES, load_checkpoint, source_format
from ddscore_jax.errors import InputError
from ddscore_jax.extract import Progress


def expand_sources(sources: Sequence[str | os.PathLike]) -> list[Path]:
    """Files to convert: each file as given, each folder as the checkpoints directly inside it."""
    files: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            found = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not found:
                raise InputError(f"{src}: folder has no checkpoints ({', '.join(SUFFIXES)})")
            files += found
        elif src.exists():
            files.append(src)
        else:
            raise InputError(f"{src}: no such file or folder")
    return files


def convert_sources(sources: Sequence[str | os.PathLike], zoo_dir: str | os.PathLike, *,
                    name: str | None = None, overwrite: bool = False,
                    progress: Progress | None = None) -> tuple[list[str], list[str]]:
    """Import every source into ``zoo_dir``. Returns (names written, names already there).

    Every file is read and checked before anything is written, so a bad file leaves the zoo as it
    was.
    """
    files = expand_sources(sources)
    if name is not None and len(files) != 1:
        raise InputError(f"--name {name!r} needs exactly one source checkpoint, got {len(files)}")
    additions = []
    for i, path in enumerate(files):
        model_name = name if name is not None else path.stem
        if not zoo.NAME.match(model_name):
            raise InputError(f"{path}: {model_name!r} is not a usable model name "
                             f"({zoo.NAME_RULE})")
        fmt = source_format(path)
        imported = load_checkpoint(path)
        additions.append(zoo.Addition(model_name, path.resolve(), fmt, zoo.sha256_file(path),
                                      imported))
        if progress:
            progress("reading checkpoints", i + 1, len(files))
    written = zoo.add(zoo_dir, additions, overwrite=overwrite)
    return written, [a.name for a in additions if a.name not in written]
