"""Checks that keep a hostile or broken checkpoint from costing memory or a silently wrong ranking.

- :func:`check_zip_sizes`, before a zip-format file (torch's ``.pth`` since 1.6) is read: the sizes
  its directory declares must be plausible for the file's size, so a few megabytes that inflate to
  gigabytes are refused before anything is inflated.
- :func:`check_parameters`, after a checkpoint is read: every tensor finite, every BatchNorm
  variance non-negative. Such a model would import, extract NaN features and score 0.0 or n/a.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ddscore_jax.errors import InputError

# torch stores its records uncompressed (ratio 1) and float weights deflate by ~1.1x, so these
# bounds leave any honest archive a wide margin.
MAX_RECORD_RATIO = 100  # declared / compressed size of one record
MAX_TOTAL_RATIO = 20  # declared size of all records / the file's size
SMALL = 64 << 20  # declarations below this many bytes are never worth refusing


def check_zip_sizes(path: Path) -> None:
    """Refuse a zip archive whose declared uncompressed sizes are implausible for its size.

    Reads only the zip directory. Not a zip (a legacy torch pickle): nothing to check.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # the reader that follows reports a damaged archive in its own words
    size = path.stat().st_size
    total = sum(i.file_size for i in infos)
    for i in infos:
        if i.file_size > SMALL and i.file_size > MAX_RECORD_RATIO * max(i.compress_size, 1):
            raise InputError(f"{path}: refused: record {i.filename} declares {_mib(i.file_size)} "
                             f"compressed into {_mib(i.compress_size)} (a zip bomb?)")
    if total > SMALL and total > MAX_TOTAL_RATIO * size:
        raise InputError(f"{path}: refused: its records declare {_mib(total)} in a "
                         f"{_mib(size)} file (a zip bomb?)")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def check_parameters(tensors: Mapping[str, np.ndarray], source: str) -> None:
    """InputError naming the first tensor with a NaN or an infinity, or a BatchNorm
    ``running_var`` with a negative entry."""
    for name, value in tensors.items():
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.number):
            continue
        bad = ~np.isfinite(value)
        if bad.any():
            kind = "NaN" if np.isnan(value).any() else "infinite"
            raise InputError(f"{source}: refused: tensor {name} has {int(bad.sum())} {kind} "
                             f"value(s) of {value.size}")
        if name.endswith("running_var") and (value < 0).any():
            raise InputError(f"{source}: refused: BatchNorm variance {name} has "
                             f"{int((value < 0).sum())} negative value(s) (min {value.min():.3g})")


def check_float_dtypes(tensors: Mapping[str, object], source: str) -> None:
    """InputError naming the first parameter stored as an integer or boolean: damage, which a
    cast to float32 would hide."""
    for name, value in tensors.items():
        # ml_dtypes' bfloat16 (what NumPy holds a bfloat16 safetensors in) is not np.floating.
        floating = (value.is_floating_point() if hasattr(value, "is_floating_point")
                    else np.issubdtype(np.asarray(value).dtype, np.floating)
                    or np.asarray(value).dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"))
        if not floating:
            dtype = str(getattr(value, "dtype", "?")).removeprefix("torch.")
            raise InputError(f"{source}: tensor {name} has dtype {dtype}, expected a "
                             "floating-point type")
