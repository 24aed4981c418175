"""The target data set: torchvision ``ImageFolder`` order and the published preprocessing.

Order: classes are the sorted sub-folder names; files are walked as ``ImageFolder`` walks them
(``sorted(os.walk(..., followlinks=True))``, names sorted, extensions matched case-insensitively).
``DATA/train`` then ``DATA/valid`` when both exist, as the reference concatenates them.

Pixels: Pillow open -> RGB -> bilinear resize to a square -> /255 -> ImageNet normalisation, in
float32 with the same operations in the same order as ``torchvision.transforms`` (bit-identical).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ddscore_jax.errors import InputError, readable

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SPLITS = ("train", "valid")


@dataclass(frozen=True)
class Dataset:
    """A labelled image set: ``paths`` relative to ``root``; ``labels[i]`` indexes ``classes``."""

    root: Path
    paths: tuple[str, ...]
    labels: np.ndarray  # int64, (n,)
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class _Walk:
    """What one scan has seen: real folders and files by (device, inode), so a symlink loop or
    a second link to the same folder or image is walked and counted once."""

    dirs: set[tuple[int, int]] = field(default_factory=set)
    files: set[tuple[int, int]] = field(default_factory=set)
    repeated_dirs: list[str] = field(default_factory=list)
    repeated_files: int = 0
    not_regular: list[str] = field(default_factory=list)

    def claim(self, path: str | os.PathLike) -> None:
        st = os.stat(path)
        self.dirs.add((st.st_dev, st.st_ino))

    def first_visit(self, path: str) -> bool:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in self.dirs:
            self.repeated_dirs.append(path)
            return False
        self.dirs.add(key)
        return True

    def warn(self, root: Path) -> None:
        if self.repeated_dirs:
            first = readable(os.path.relpath(self.repeated_dirs[0], root))
            log.warning("%s: %d symlinked folder(s) lead to a folder already read (a loop or a "
                        "second link, e.g. %s); each image is counted once", root,
                        len(self.repeated_dirs), first)
        if self.repeated_files:
            log.warning("%s: %d image link(s) point to an image already counted; each image is "
                        "counted once", root, self.repeated_files)
        if self.not_regular:
            first = readable(os.path.relpath(self.not_regular[0], root))
            log.warning("%s: skipped %d image name(s) that are not regular files (e.g. %s: a "
                        "pipe, socket or device)", root, len(self.not_regular), first)


def _walk_error(e: OSError) -> None:
    raise InputError(f"{readable(str(e.filename))}: cannot read folder ({e.strerror})")


def _image_file(path: str, seen: _Walk) -> bool:
    """Whether ``path`` (an image name) is an image to read: a regular file not counted yet.

    Only regular files: opening a FIFO named ``x.png`` would block forever. Symlinks are followed;
    one that leads nowhere is the user's to fix, so it is an error, not a silent gap."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise InputError(f"{readable(path)}: broken symbolic link (its target "
                             f"{readable(os.readlink(path))} does not exist)") from None
        raise
    except OSError as e:
        raise InputError(f"{readable(path)}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        seen.not_regular.append(path)
        return False
    key = (st.st_dev, st.st_ino)
    if key in seen.files:
        seen.repeated_files += 1
        return False
    seen.files.add(key)
    return True


def _image_folder(folder: Path, seen: _Walk) -> tuple[list[str], list[tuple[Path, int]]]:
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        raise InputError(f"{readable(str(folder))}: cannot read folder ({e.strerror})") from None
    classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        raise InputError(f"{readable(str(folder))}: no class folders (expected a sub-folder of "
                         "images per class)")
    # Every class folder is claimed before any is walked: a link from one class to the data root
    # must not pull another class's images in under the wrong label.
    seen.claim(folder)
    for cls in classes:
        seen.claim(folder / cls)
    samples = []
    for label, cls in enumerate(classes):
        found = 0
        walked = []
        # topdown os.walk lets us prune folders already read (loops, repeated links) in place.
        for root, dirs, names in os.walk(folder / cls, followlinks=True, onerror=_walk_error):
            dirs[:] = [d for d in dirs if seen.first_visit(os.path.join(root, d))]
            walked.append((root, names))
        # ImageFolder's order: sorted(os.walk(...)), names sorted within each folder.
        for root, names in sorted(walked):
            for name in sorted(names):
                path = os.path.join(root, name)
                if name.lower().endswith(IMG_EXTENSIONS) and _image_file(path, seen):
                    samples.append((Path(path), label))
                    found += 1
        if not found:
            raise InputError(f"{readable(str(folder / cls))}: class folder has no images "
                             f"({', '.join(IMG_EXTENSIONS)})")
    return [readable(c) for c in classes], samples


def scan(root: str | os.PathLike) -> Dataset:
    """Index a folder-of-classes data set (no pixels read). Raises InputError on a bad layout."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: data folder does not exist")
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    splits = [root / s for s in SPLITS if (root / s).is_dir()]
    seen = _Walk()
    seen.claim(root)
    if not splits:
        classes, samples = _image_folder(root, seen)
    else:
        classes, samples = None, []
        for split in splits:
            split_classes, split_samples = _image_folder(split, seen)
            if classes is not None and split_classes != classes:
                raise InputError(f"{split}: classes {split_classes} differ from those of "
                                 f"{splits[0]} {classes}")
            classes = split_classes
            samples += split_samples
    seen.warn(root)
    if len(classes) < 2:
        raise InputError(f"{root}: only one class ({classes[0]}); D-deepscore needs at least 2")
    return Dataset(
        root=root,
        paths=tuple(str(p.relative_to(root)) for p, _ in samples),
        labels=np.array([label for _, label in samples], dtype=np.int64),
        classes=tuple(classes),
    )


def load_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """One image as (image_size, image_size, 3) float32, normalised. InputError names a bad file."""
    try:
        with Image.open(path) as img:
            return preprocess(img, image_size)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: cannot read image ({e})") from None


def preprocess(img: Image.Image, image_size: int) -> np.ndarray:
    """A Pillow image -> (image_size, image_size, 3) float32: RGB, bilinear resize, /255, ImageNet
    normalisation. The one preprocessing: files (:func:`load_image`) and in-memory images alike."""
    rgb = img.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    # Same float32 operations in the same order as ToTensor() and Normalize().
    x = np.asarray(rgb, dtype=np.float32) / np.float32(255)
    return (x - MEAN) / STD


def load_batch(dataset: Dataset, indices: range | list[int], image_size: int) -> np.ndarray:
    """Images ``indices`` of ``dataset`` stacked as (len(indices), S, S, 3) float32."""
    out = np.empty((len(indices), image_size, image_size, 3), dtype=np.float32)
    for j, i in enumerate(indices):
        out[j] = load_image(dataset.root / dataset.paths[i], image_size)
    return out
