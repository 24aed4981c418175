"""The Hugging Face hub cache as a source of checkpoints: its root, a repository folder, a repo id.

The cache layout is huggingface_hub's (its "Understand caching" guide)::

    <cache>/models--<org>--<name>/blobs/<sha>             the files' bytes
    <cache>/models--<org>--<name>/snapshots/<rev>/<file>  symlinks into blobs
    <cache>/models--<org>--<name>/refs/main               the revision ``main`` names

A repository folder stands for the snapshot ``refs/main`` names (the only snapshot where there is
no ``refs/main``); the cache root for each model repository in it. The cache is where
huggingface_hub looks: ``HF_HUB_CACHE``, else the legacy ``HUGGINGFACE_HUB_CACHE``, else
``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``.

With the ``hub`` extra (huggingface_hub) the cache is read through its API (``scan_cache_dir``,
``try_to_load_from_cache``), and a repo id missing from it is downloaded (its config and weights
only) unless ``HF_HUB_OFFLINE`` is set. Without it the same layout is read from disk, and a
missing id is refused with how to get it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ddscore_jax.converters.files import HUB_CONFIG, HUB_WEIGHTS, is_model_folder
from ddscore_jax.errors import InputError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a download fetches: the config and the weights convert reads, never the other files.
_DOWNLOAD = [HUB_CONFIG, *HUB_WEIGHTS, "*.safetensors"]


def cache_dir() -> Path:
    """The hub cache folder, with huggingface_hub's precedence of environment variables (read
    at each call, as huggingface_hub reads them once at its import)."""
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(os.path.expandvars(os.path.expanduser(env[var])))
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or transformers' ``TRANSFORMERS_OFFLINE``) set to a true value."""
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def is_repo_folder(path: Path) -> bool:
    """A cached repository: ``models--<org>--<name>`` with ``snapshots/`` inside."""
    return path.is_dir() and path.name.startswith("models--") and (path / "snapshots").is_dir()


def is_cache_root(path: Path) -> bool:
    """A hub cache: a folder holding cached repositories (``models--*``, ``datasets--*``...)."""
    return path.is_dir() and any(
        p.name.startswith(("models--", "datasets--", "spaces--")) and (p / "snapshots").is_dir()
        for p in path.iterdir())


def looks_like_repo_id(text: str) -> bool:
    """``timm/resnet50.a1_in1k``: one slash, hub name characters (checked only for a source that
    is not a path on disk)."""
    return bool(_REPO_ID.match(text)) and not text.startswith(("./", "../"))


def snapshot(repo: Path) -> Path:
    """The snapshot folder a cached repository stands for: the one ``refs/main`` names, else
    its only snapshot. InputError naming ``repo`` otherwise."""
    ref = repo / "refs" / "main"
    snapshots = repo / "snapshots"
    if ref.is_file():
        rev = ref.read_text().strip()
        if not rev or Path(rev).name != rev or not (snapshots / rev).is_dir():
            raise InputError(f"{repo}: refs/main names revision {rev!r}, which is not in "
                             "snapshots/ (an interrupted download?)")
        return snapshots / rev
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) == 1:
        return found[0]
    raise InputError(f"{repo}: no refs/main and {len(found)} snapshots: convert one of "
                     f"{snapshots}/<revision> itself")


@dataclass
class CacheEntry:
    """A model repository of the cache: its snapshot to convert, or why it is skipped."""

    repo: str  # ``org/name``
    path: Path | None
    skipped: str | None = None


def scan(root: Path) -> list[CacheEntry]:
    """Every model repository of the cache at ``root``: the snapshot of each that may hold a
    ResNet, and for the others one line saying why they are skipped."""
    repos = _scan_with_hub(root)
    if repos is None:
        repos = [(_repo_id(p.name), p) for p in sorted(root.iterdir()) if is_repo_folder(p)]
    out = []
    for repo_id, folder in repos:
        try:
            snap = snapshot(folder)
        except InputError as e:
            out.append(CacheEntry(repo_id, None, str(e)))
            continue
        why = _not_a_resnet(snap)
        out.append(CacheEntry(repo_id, None if why else snap, why and f"{folder}: {why}"))
    return out


def _scan_with_hub(root: Path) -> list[tuple[str, Path]] | None:
    try:
        from huggingface_hub import scan_cache_dir
    except ImportError:
        return None
    try:
        info = scan_cache_dir(root)
    except Exception as e:  # noqa: BLE001 - CacheNotFound, CorruptedCacheException, OSError
        raise InputError(f"{root}: unreadable Hugging Face cache ({str(e).splitlines()[0]})"
                         ) from None
    return sorted((r.repo_id, Path(r.repo_path)) for r in info.repos if r.repo_type == "model")


def _repo_id(folder_name: str) -> str:
    return folder_name[len("models--"):].replace("--", "/")


def _not_a_resnet(snap: Path) -> str | None:
    """Why a snapshot holds no ResNet this tool reads, from its config.json alone (so that a
    cache of language models is not read byte by byte); None where it may hold one."""
    if not is_model_folder(snap):
        return (f"snapshot {snap.name} has no {HUB_CONFIG} with weights "
                f"({', '.join(HUB_WEIGHTS)})")
    try:
        config = json.loads((snap / HUB_CONFIG).read_text())
    except (ValueError, OSError):
        return None  # convert reports the unreadable config in its own words
    if not isinstance(config, dict):
        return None
    arch = config.get("architecture")
    if isinstance(arch, str):  # a timm hub folder (save_for_hf)
        return None if "resne" in arch else f"timm architecture {arch!r}, not a ResNet"
    kind = config.get("model_type")
    if kind in ("resnet", "timm_wrapper") or kind is None:
        return None
    return f"config.json model_type {kind!r}, not a ResNet"


def resolve_repo_id(repo_id: str) -> Path:
    """The cached snapshot of ``repo_id`` (``main``), downloaded first where the ``hub`` extra
    is installed and the network allowed. InputError saying how to get it otherwise."""
    root = cache_dir()
    try:
        import huggingface_hub
    except ImportError:
        folder = root / f"models--{repo_id.replace('/', '--')}"
        if is_repo_folder(folder):
            return snapshot(folder)
        raise InputError(f"{repo_id}: not a file or folder, nor a model in the Hugging Face "
                         f"cache at {root}; download it with `hf download {repo_id}` or "
                         "pip install 'ddscore-jax[hub]'") from None
    cached = huggingface_hub.try_to_load_from_cache(repo_id, HUB_CONFIG, cache_dir=root)
    if isinstance(cached, str):
        return Path(cached).parent
    folder = root / f"models--{repo_id.replace('/', '--')}"
    if is_repo_folder(folder):  # cached without a config.json: let convert say what it holds
        return snapshot(folder)
    if offline() or huggingface_hub.constants.HF_HUB_OFFLINE:
        raise InputError(f"{repo_id}: not a file or folder, nor a model in the Hugging Face "
                         f"cache at {root}, and HF_HUB_OFFLINE is set: download it with "
                         f"`hf download {repo_id}` where the network is allowed")
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, cache_dir=root,
                                                      allow_patterns=_DOWNLOAD))
    except Exception as e:  # noqa: BLE001 - not found, gated, no network: one line each
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{repo_id}: not in the Hugging Face cache at {root}, and the "
                         f"download failed ({first[:200]})") from None
