"""The target data set: torchvision ``ImageFolder`` order and the published preprocessing.

Order: classes are the sorted sub-folder names; files are walked as ``ImageFolder`` walks them
(``sorted(os.walk(..., followlinks=True))``, names sorted, extensions matched case-insensitively).
``DATA/train`` then ``DATA/valid`` when both exist, as the reference concatenates them.

Pixels: Pillow open -> RGB -> bilinear resize to a square -> /255 -> ImageNet normalisation, in
float32 with the same operations in the same order as ``torchvision.transforms`` (bit-identical).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ddscore_jax.errors import InputError

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


def _image_folder(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise InputError(f"{folder}: no class folders (expected a sub-folder of images per class)")
    samples = []
    for label, cls in enumerate(classes):
        found = 0
        for root, _, names in sorted(os.walk(folder / cls, followlinks=True)):
            for name in sorted(names):
                if name.lower().endswith(IMG_EXTENSIONS):
                    samples.append((Path(root) / name, label))
                    found += 1
        if not found:
            raise InputError(f"{folder / cls}: class folder has no images "
                             f"({', '.join(IMG_EXTENSIONS)})")
    return classes, samples


def scan(root: str | os.PathLike) -> Dataset:
    """Index a folder-of-classes data set (no pixels read). Raises InputError on a bad layout."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: data folder does not exist")
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    splits = [root / s for s in SPLITS if (root / s).is_dir()]
    if not splits:
        classes, samples = _image_folder(root)
    else:
        classes, samples = None, []
        for split in splits:
            split_classes, split_samples = _image_folder(split)
            if classes is not None and split_classes != classes:
                raise InputError(f"{split}: classes {split_classes} differ from those of "
                                 f"{splits[0]} {classes}")
            classes = split_classes
            samples += split_samples
    if len(classes) < 2:
        raise InputError(f"{root}: only one class ({classes[0]}); D-deepscore needs at least 2")
    return Dataset(
        root=root,
        paths=tuple(str(p.relative_to(root)) for p, _ in samples),
        labels=np.array([label for _, label in samples], dtype=np.int64),
        classes=tuple(classes),
    )


def load_image(path: str | os.PathLike, image_size: int = 224) -> np.ndarray:
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
