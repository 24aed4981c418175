"""Labelled image sets made from data that ships inside packages (nothing is downloaded).

The demo (:mod:`ddscore_jax.demo`) and the transfer benchmark (``benchmarks/transfer_zoo.py``)
pre-train models and build targets from the same pieces, kept here once:

- ``digits``: scikit-learn's ``load_digits`` (8x8 handwritten digits, 10 classes);
- ``faces``: scikit-image's ``lfw_subset`` (25x25, 100 faces then 100 non-faces);
- crops of scikit-image's bundled pictures (grayscale textures, colour scenes), one class per
  picture; the top :data:`TRAIN_ROWS` of every picture feed sources, the rows below it targets,
  so a target's pixels were never seen in pre-training;
- synthetic surface defects (a thin scratch, a soft spot) painted on clean crops.

Images are uint8, ``(n, h, w)`` grayscale or ``(n, h, w, 3)`` colour; :func:`to_inputs` turns
them into network inputs with :func:`ddscore_jax.data.preprocess`, the preprocessing every image
file gets, so pre-training sees exactly what the ranking later reads from the PNG files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from ddscore_jax import data

CROP = 64  # crops of the pictures, in source pixels, before resizing
TRAIN_ROWS = 0.7
TEXTURES = ("brick", "grass", "gravel", "camera", "coins", "moon", "text", "page", "clock", "cell")
SCENES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "colorwheel")
DEFECT_CLASSES = ("clean", "scratch", "spot")
Part = Literal["all", "source", "target"]


@dataclass(frozen=True)
class Labelled:
    """``images`` uint8 (n, h, w[, 3]); ``labels`` int64 (n,) index ``classes``."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]


def picture(name: str, color: bool = False) -> np.ndarray:
    """A scikit-image bundled picture, grayscale (h, w) or RGB (h, w, 3) uint8."""
    from skimage import data as skdata

    img = getattr(skdata, name)()
    if img.ndim == 2 and not color:
        return img
    return np.asarray(Image.fromarray(img[..., :3] if img.ndim == 3 else img)
                      .convert("RGB" if color else "L"))


def rows(img: np.ndarray, part: Part) -> np.ndarray:
    """The rows of a picture that feed sources (``"source"``) or targets (``"target"``)."""
    cut = int(TRAIN_ROWS * img.shape[0])
    return img[:cut] if part == "source" else img[cut:]


def crops(img: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random CROP x CROP crops of ``img``."""
    h, w = img.shape[:2]
    ys, xs = rng.integers(0, h - CROP + 1, count), rng.integers(0, w - CROP + 1, count)
    return np.stack([img[y:y + CROP, x:x + CROP] for y, x in zip(ys, xs, strict=True)])


def picture_crops(name: str, pictures: Sequence[str], part: Part, per_class: int, *,
                  color: bool = False, seed: int = 0) -> Labelled:
    """``per_class`` crops of each picture's ``part`` rows; one class per picture."""
    rng = np.random.default_rng(seed)
    images = [crops(rows(picture(p, color), part), per_class, rng) for p in pictures]
    labels = np.repeat(np.arange(len(pictures), dtype=np.int64), per_class)
    return Labelled(name, np.concatenate(images), labels, tuple(pictures))


def digits(part: Part = "all") -> Labelled:
    """scikit-learn's 1797 digits; ``"source"`` the even-indexed half, ``"target"`` the odd."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.ones(len(d.target), bool)
    if part != "all":
        keep = np.arange(len(d.target)) % 2 == (0 if part == "source" else 1)
    images = np.round(d.images[keep] * (255 / 16)).astype(np.uint8)  # pixel values run 0..16
    return Labelled("digits", images, d.target[keep].astype(np.int64),
                    tuple(str(i) for i in range(10)))


def faces(part: Part = "all") -> Labelled:
    """scikit-image's ``lfw_subset`` (label 1: face); ``"source"`` the first 70 of each class,
    ``"target"`` the other 30."""
    from skimage import data as skdata

    images = np.round(skdata.lfw_subset() * 255).astype(np.uint8)
    labels = np.repeat(np.array([1, 0], np.int64), 100)  # the first 100 are faces
    keep = np.ones(200, bool)
    if part != "all":
        keep = (np.arange(200) % 100 < 70) == (part == "source")
    return Labelled("faces", images[keep], labels[keep], ("non-face", "face"))


def add_scratch(crop: np.ndarray, rng: np.random.Generator,
                width: tuple[float, float] = (1.5, 2.5)) -> np.ndarray:
    """A thin straight mark across a good part of the crop, brighter or darker than its surface
    (``width`` in source pixels: wide enough to survive the resize to the network's size)."""
    yy, xx = np.mgrid[0:CROP, 0:CROP].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0.3 * CROP, 0.7 * CROP, 2)
    half_len = rng.uniform(0.3, 0.5) * CROP
    w = rng.uniform(*width)
    dy, dx = np.sin(angle), np.cos(angle)
    along = (yy - cy) * dy + (xx - cx) * dx
    across = np.abs(-(yy - cy) * dx + (xx - cx) * dy)
    return _paint(crop, np.clip(w - across, 0, 1) * (np.abs(along) <= half_len), rng)


def add_spot(crop: np.ndarray, rng: np.random.Generator,
             radius: tuple[float, float] = (0.08, 0.16)) -> np.ndarray:
    """A soft-edged blob, like a stain or a pit (``radius`` as fractions of the crop)."""
    yy, xx = np.mgrid[0:CROP, 0:CROP].astype(np.float32)
    cy, cx = rng.uniform(0.25 * CROP, 0.75 * CROP, 2)
    ry, rx = rng.uniform(*radius, 2) * CROP
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return _paint(crop, np.clip((1.0 - r) * 4, 0, 1), rng)


def _paint(crop: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    value = 255.0 if rng.random() < 0.5 else 0.0
    out = crop.astype(np.float32) * (1 - mask) + value * mask
    return np.clip(out, 0, 255).round().astype(np.uint8)


def defects(surfaces: Sequence[np.ndarray], per_class: int, rng: np.random.Generator, *,
            scratch_width: tuple[float, float] = (1.5, 2.5),
            spot_radius: tuple[float, float] = (0.08, 0.16)) -> Labelled:
    """``clean`` / ``scratch`` / ``spot`` crops, ``per_class`` each; the i-th crop of a class
    comes from surface ``i % len(surfaces)``."""
    images, labels = [], []
    for c, kind in enumerate(DEFECT_CLASSES):
        for i in range(per_class):
            crop = crops(surfaces[i % len(surfaces)], 1, rng)[0]
            if kind == "scratch":
                crop = add_scratch(crop, rng, scratch_width)
            elif kind == "spot":
                crop = add_spot(crop, rng, spot_radius)
            images.append(crop)
            labels.append(c)
    return Labelled("defects", np.stack(images), np.array(labels, np.int64), DEFECT_CLASSES)


def to_inputs(images: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 images -> (n, S, S, 3) float32 network inputs, as :func:`data.load_image` reads
    the same images from PNG files (bit for bit)."""
    out = np.empty((len(images), image_size, image_size, 3), np.float32)
    for i, img in enumerate(images):
        out[i] = data.preprocess(Image.fromarray(img), image_size)
    return out


def params_digest(state_dict: dict[str, np.ndarray]) -> str:
    """A digest of parameter names, shapes and float32 bytes, in sorted name order: the
    ``sha256`` a zoo records for a model made here (it has no source file to hash)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        value = np.ascontiguousarray(state_dict[key], np.float32)
        h.update(f"{key}:{value.shape}".encode())
        h.update(value.tobytes())
    return h.hexdigest()
