"""Which models to fine-tune next, from a saved ranking (``finetune --top K --ranking FILE``).

The paper's pipeline is "score all, fine-tune the best"; with intervals, "the best" is a set: the
K best of the ranking plus every model that cannot be told apart from them (docs/uncertainty.md):

- K = 1: the leader's group (the leader, and every model whose paired difference to it has a 95%
  interval containing 0: ``tied_with_best``);
- K >= 2: the K best, plus every model whose 95% rank interval reaches rank K or better.

A ranking without intervals (``--resamples 0``) gives the K best alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ddscore_jax import zoo
from ddscore_jax.errors import InputError


def read_ranking(path: str | os.PathLike) -> dict:
    """A ``rank --json`` document, or InputError naming the file and the problem."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: ranking file does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a ranking JSON file ({e.__class__.__name__})") from None
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, list) or not all(
            isinstance(m, dict) and isinstance(m.get("name"), str) for m in models):
        raise InputError(f"{path}: not a `rank --json` file (no list of named models)")
    if not models:
        raise InputError(f"{path}: the ranking has no models")
    return doc


def top(doc: dict, k: int) -> list[str]:
    """The models to fine-tune from a ranking document: see the module docstring. Rank order."""
    if k < 1:
        raise InputError(f"--top must be at least 1, got {k}")
    models = sorted(doc["models"], key=lambda m: m.get("rank", 0))
    chosen = [m["name"] for m in models[:k]]
    for m in models[k:]:
        lo = (m.get("rank_interval") or [None])[0]
        if (k == 1 and m.get("tied_with_best")) or (k > 1 and lo is not None and lo <= k):
            chosen.append(m["name"])
    return chosen


def check_zoo(doc: dict, names: list[str], zoo_dir: str | os.PathLike,
              path: str | os.PathLike) -> None:
    """InputError unless the ranking ranked this zoo: every chosen model is in it, with the same
    checkpoint where the ranking records one (``zoo.sha256``)."""
    entries = {e.name: e for e in zoo.read_nonempty(zoo_dir)}
    missing = [n for n in names if n not in entries]
    if missing:
        raise InputError(f"{path}: a ranking of another zoo ({', '.join(missing)} not in "
                         f"{zoo_dir})")
    recorded = (doc.get("zoo") or {}).get("sha256") or {}
    changed = [n for n in names if n in recorded and recorded[n] != entries[n].sha256]
    if changed:
        raise InputError(f"{path}: a ranking of another zoo ({', '.join(changed)} has another "
                         f"checkpoint in {zoo_dir}); rank this zoo again")
