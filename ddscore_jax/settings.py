"""The options of ``extract``, ``score``, ``rank`` and ``finetune``: defaults and validation in one
place.

Frozen: the library's keyword defaults and the CLI's option defaults are read from these classes,
and ``check`` is the one validation. ``rank`` is an :class:`ExtractSettings` plus a
:class:`ScoreSettings`; its ``--json`` ``settings`` block is :func:`to_json` of the pair.
``finetune``'s are :class:`FinetuneSettings` (``ddscore_jax.finetuning.Settings``).

Light on purpose: the CLI reads its option defaults, choices and help from here while parsing, so
``--help`` and argument errors answer without importing JAX (nothing here imports more than the
standard library at module level).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

from ddscore_jax.errors import InputError

# Imports run one way: ddscore -> settings, metrics -> settings, never back. This module imports
# nothing heavy (the CLI reads its defaults before jax loads).

RCOND = 1e-10  # the reference's pinv cut-off (D-deepscore, H-scores); recorded in the settings

Dtype = Literal["float32", "bfloat16"]
DTYPES: tuple[str, ...] = Dtype.__args__
# auto: onnxruntime for a float32 forward on CPU when installed, else jax (docs/extraction.md).
Engine = Literal["auto", "jax", "onnxruntime"]
ENGINES: tuple[str, ...] = Engine.__args__
Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["cosine", "constant"]
OPTIMIZERS: tuple[str, ...] = Optimizer.__args__
SCHEDULES: tuple[str, ...] = Schedule.__args__

# The metrics' names in column order, and those that need the source classifier (LEEP, NCE). Their
# registry is ddscore_jax.metrics.METRICS, which imports JAX: the option checks and --help read
# these instead, and tests/test_metrics.py checks that the two agree.
METRIC_NAMES: tuple[str, ...] = ("ddscore", "hscore", "shrinkage_hscore", "logme", "transrate",
                                 "gbc", "knn", "leep", "nce")
HEAD_METRICS: tuple[str, ...] = ("leep", "nce")

# Five stride-2 steps reach conv4_x; below 32 px a feature map would vanish.
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 4096  # a 32-image batch is then 6 GiB of float32 pixels already


def check_image_and_batch(image_size: int, batch_size: int) -> None:
    """The image size and batch checks that every command with a forward shares."""
    if image_size < MIN_IMAGE_SIZE:
        raise InputError(f"--image-size must be at least {MIN_IMAGE_SIZE} (5 stride-2 steps), "
                         f"got {image_size}")
    if image_size > MAX_IMAGE_SIZE:
        raise InputError(f"--image-size must be at most {MAX_IMAGE_SIZE}, got {image_size}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")


@dataclass(frozen=True)
class ExtractSettings:
    """How features are computed: everything but ``workers`` changes them (the engines agree to
    float32 rounding, not bit for bit, and the feature cache keeps them apart)."""

    batch_size: int = 32
    image_size: int = 224
    dtype: Dtype = "float32"
    workers: int | None = None  # decode threads: default one per core, at most 8; 0 inline
    engine: Engine = "auto"

    def check(self) -> ExtractSettings:
        """``self``, or InputError naming the first bad option (checked before any work, so a typo
        never costs an extraction)."""
        check_image_and_batch(self.image_size, self.batch_size)
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.engine not in ENGINES:
            raise InputError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.workers is not None and self.workers < 0:
            raise InputError(f"--workers must be at least 0, got {self.workers}")
        return self


# Fewer bootstrap replicates than this make a 95% percentile interval little more than the
# extremes of a handful of draws (docs/uncertainty.md).
MIN_RESAMPLES = 20
CONFIDENCE = 0.95  # of every interval: score, rank and the paired difference to the leader


@dataclass(frozen=True)
class ScoreSettings:
    """How features become scores: the seeded subset, the metrics (the first ranks) and the
    number of bootstrap replicates behind the intervals (0: none; docs/uncertainty.md). The
    bootstrap is seeded by ``seed`` too, so one seed repeats a whole run."""

    train_fraction: float = 0.8
    seed: int = 0
    metrics: tuple[str, ...] = ("ddscore",)
    # 200: a fifth of a cold 10-model rank's time (benchmarks/README.md); docs/uncertainty.md
    resamples: int = 200

    def check(self, known_metrics: Collection[str]) -> ScoreSettings:
        """``self`` with the metric names cleaned (in order, without repeats), or InputError.
        ``known_metrics`` is the registry (``ddscore_jax.metrics.METRICS``), passed in so that
        this module never imports the score modules that import it."""
        if not 0.0 < self.train_fraction <= 1.0:
            raise InputError(f"--train-fraction must be in (0, 1], got {self.train_fraction}")
        if self.seed < 0:
            raise InputError(f"--seed must be a non-negative integer, got {self.seed}")
        if self.resamples != 0 and self.resamples < MIN_RESAMPLES:
            raise InputError(f"--resamples must be 0 (off) or at least {MIN_RESAMPLES}, got "
                             f"{self.resamples}")
        names = list(dict.fromkeys(m.strip() for m in self.metrics if m.strip()))
        for m in names:
            if m not in known_metrics:
                raise InputError(f"--metric {m}: unknown metric; choose from "
                                 f"{', '.join(known_metrics)}")
        return replace(self, metrics=tuple(names or ScoreSettings.metrics))


def to_json(score: ScoreSettings, precision: str, extract: ExtractSettings | None = None) -> dict:
    """The ``settings`` block of ``score``/``rank --json`` (docs/interface.md): every setting that
    changed the numbers. Without ``extract`` (scoring saved features) the image size and the
    forward's dtype are not ours to know."""
    from ddscore_jax.model import SCORE_BLOCKS  # a leaf; imported here to keep this module light

    out = {"train_fraction": score.train_fraction, "seed": score.seed}
    if extract is not None:
        out["image_size"] = extract.image_size
    out |= {"blocks": list(SCORE_BLOCKS), "rcond": RCOND, "precision": precision,
            "metrics": list(score.metrics), "resamples": score.resamples,
            "confidence": CONFIDENCE}
    if extract is not None:  # the forward's dtype and engine change the features, so the score
        out["forward_dtype"] = extract.dtype
        out["forward_engine"] = extract.engine  # as resolved: never "auto"
    return out


# What a fine-tuning run's record is matched on besides model, data, learning rate and seed: the
# settings that are not the grid itself, so that widening the grid or adding seeds reuses every run.
_GRID_FIELDS = ("learning_rates", "seeds", "seed")


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything that changes a fine-tuned accuracy (``finetune``; see
    :mod:`ddscore_jax.finetuning`). A run is reused only if all match."""

    image_size: int = 64
    batch_size: int = 32
    epochs: float = 10.0
    optimizer: Optimizer = "adamw"
    # The grid every model is tried at; its accuracy is that of the best rate (mean over seeds).
    learning_rates: tuple[float, ...] = (1e-3, 3e-4, 1e-4)
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4  # fixed, not searched
    schedule: Schedule = "cosine"
    clip_norm: float = 1.0
    flip: bool = False
    seeds: int = 1  # repeats per learning rate: seeds seed, seed + 1, ...
    seed: int = 0

    def check(self) -> None:
        """InputError naming the first bad option."""
        check_image_and_batch(self.image_size, self.batch_size)
        if not self.epochs > 0:
            raise InputError(f"--epochs must be positive, got {self.epochs}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, "
                             f"got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"--schedule must be one of {', '.join(SCHEDULES)}, "
                             f"got {self.schedule!r}")
        if not self.learning_rates or not all(lr > 0 for lr in self.learning_rates):
            raise InputError(f"--learning-rate must be positive (one or more), "
                             f"got {list(self.learning_rates)}")
        if len(set(self.learning_rates)) != len(self.learning_rates):
            raise InputError(f"--learning-rate values repeat: {list(self.learning_rates)}")
        if not 0 <= self.momentum < 1:
            raise InputError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.clip_norm < 0:
            raise InputError(f"--clip-norm must be at least 0 (0: no clipping), "
                             f"got {self.clip_norm}")
        if self.weight_decay < 0:
            raise InputError(f"--weight-decay must be at least 0, got {self.weight_decay}")
        if self.seeds < 1:
            raise InputError(f"--seeds must be at least 1, got {self.seeds}")

    def run_settings(self) -> dict:
        """The settings a single run depends on (the grid left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in _GRID_FIELDS}

    def to_json(self) -> dict:
        return {**asdict(self), "learning_rates": list(self.learning_rates)}
