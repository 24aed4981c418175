"""D-deepscore (docs/method.md), jitted and vectorised over models and blocks.

The published score, for one block's features ``f`` (n x d) and labels ``y``, is
``trace(pinv(F, rcond=1e-10) @ G)`` with ``F``, ``G`` the uncentred covariances of ``f`` and of its
class-mean matrix ``g``, each rotated into its own right-singular basis. Both covariances are then
diagonal, so the score is ``sum_i sigma_i(g)^2 / sigma_i(f)^2`` over the i where
``sigma_i(f)^2 > rcond * sigma_1(f)^2``, pairing the i-th largest singular values. That is what we
compute: two small SVDs instead of two d x d pseudo-inverses, with the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

# The feature points D-deepscore averages: model.SCORE_BLOCKS (docs/method.md).
from ddscore_jax.model import SCORE_BLOCKS
from ddscore_jax.serial_lapack import map_matrices, single_threaded_blas
from ddscore_jax.settings import RCOND, ScoreSettings


def precision_for(backend: str | None = None) -> str:
    """``"float64"`` where the backend has it (CPU, GPU), ``"float32"`` on TPU."""
    return "float32" if (backend or jax.default_backend()) == "tpu" else "float64"


def train_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted indices of the seeded random subset the score uses (the reference's 80%)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train fraction must be in (0, 1], got {fraction}")
    m = max(1, int(fraction * n))
    if m == n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))


def _singular_values(x: jax.Array) -> jax.Array:
    # For tall matrices a QR first shrinks the SVD to d x d; QR is backward stable, so the small
    # singular values keep the accuracy the Gram matrix would lose.
    n, d = x.shape
    if n > d:
        x = jnp.linalg.qr(x, mode="r")
    return jnp.linalg.svd(x, compute_uv=False)


def _block_score(f: jax.Array, onehot: jax.Array, rcond: float) -> jax.Array:
    counts = onehot.sum(axis=0)
    # Rows of g are class means; its singular values are those of the C x d matrix of class means,
    # each scaled by sqrt(class size), i.e. class sums / sqrt(class size).
    scaled_means = (onehot.T @ f) / jnp.sqrt(jnp.maximum(counts, 1.0))[:, None]
    s_f = _singular_values(f)
    s_g = jnp.linalg.svd(scaled_means, compute_uv=False)
    k = min(s_g.shape[0], s_f.shape[0])
    sf2, sg2 = s_f[:k] ** 2, s_g[:k] ** 2
    keep = sf2 > rcond * s_f[0] ** 2
    return jnp.sum(jnp.where(keep, sg2 / jnp.where(keep, sf2, 1.0), 0.0))


@partial(jax.jit, static_argnames=("rcond",))
def _scores(features: jax.Array, onehot: jax.Array, rcond: float) -> jax.Array:
    # features: (..., n, d); one compiled program for every model and block at once, one matrix
    # per LAPACK call (serial_lapack: batched CPU decompositions can deadlock).
    flat = features.reshape((-1, *features.shape[-2:]))
    out = map_matrices(_block_score, flat, onehot, rcond)
    return out.reshape(features.shape[:-2])


def block_scores(features: np.ndarray, labels: np.ndarray, *, rcond: float = RCOND,
                 precision: str | None = None) -> np.ndarray:
    """D-deepscore of each feature matrix in ``features`` (..., n, d) with ``labels`` (n,).

    Returns an array of shape ``features.shape[:-2]`` (float64). Labels are any integers; they are
    re-indexed, so renaming classes changes nothing. Needs at least 2 classes.
    """
    labels = np.asarray(labels)
    features = np.asarray(features)
    if features.ndim < 2 or features.shape[-2] != labels.shape[0]:
        raise ValueError(f"features {features.shape} do not match labels {labels.shape}")
    classes, index = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"D-deepscore needs at least 2 classes, got {len(classes)}")
    precision = precision or precision_for()
    dtype = np.float64 if precision == "float64" else np.float32
    onehot = np.eye(len(classes), dtype=dtype)[index]
    single_threaded_blas()
    with jax.enable_x64(precision == "float64"):
        out = _scores(jnp.asarray(features, dtype), jnp.asarray(onehot), rcond)
        return np.asarray(out, dtype=np.float64)


@dataclass(frozen=True)
class Uncertainty:
    """How one model's score under one metric moves over the bootstrap replicates of the target
    images (ddscore_jax.resample, docs/uncertainty.md). Every interval is the 95% percentile one."""

    interval: tuple[float, float]  # of the score
    rank_interval: tuple[int, int]  # of the rank, 1 = best
    p_best: float  # fraction of replicates where it ranks first (a tie split evenly)
    tied_with_best: bool  # the leader, or the leader - model paired difference's interval holds 0

    def to_json(self) -> dict:
        return {"interval": list(self.interval), "rank_interval": list(self.rank_interval),
                "p_best": self.p_best, "tied_with_best": self.tied_with_best}


@dataclass(frozen=True)
class ModelScore:
    """One model's result: ``score`` ranks it; ``metrics`` holds every metric asked for, and
    ``metric_block_scores`` each feature metric's value per block. ``uncertainty`` has an entry
    per metric the model has, when the ranking was resampled (empty with ``resamples=0``); the
    properties read the ranking (first) metric's, None without it."""

    name: str
    score: float
    block_scores: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)
    metric_block_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    uncertainty: dict[str, Uncertainty] = field(default_factory=dict)

    def _first(self) -> Uncertainty | None:
        # The ranking metric is the first of ``metrics`` (D-deepscore alone: no metrics dict).
        first = next(iter(self.metrics), None)
        if first is None:
            return next(iter(self.uncertainty.values()), None)
        return self.uncertainty.get(first)

    @property
    def interval(self) -> tuple[float, float] | None:
        u = self._first()
        return None if u is None else u.interval

    @property
    def rank_interval(self) -> tuple[int, int] | None:
        u = self._first()
        return None if u is None else u.rank_interval

    @property
    def p_best(self) -> float | None:
        u = self._first()
        return None if u is None else u.p_best

    @property
    def tied_with_best(self) -> bool | None:
        u = self._first()
        return None if u is None else u.tied_with_best


def score_models(
    features: Mapping[str, Mapping[str, np.ndarray]],
    labels: np.ndarray,
    *,
    train_fraction: float = ScoreSettings.train_fraction,
    seed: int = ScoreSettings.seed,
    blocks: Sequence[str] = SCORE_BLOCKS,
    precision: str | None = None,
    metric: Callable[..., np.ndarray] = block_scores,
) -> list[ModelScore]:
    """Score every model: ``features[name][block]`` is (n, d). Returns them ranked, best first.

    All models share the seeded train split, so they are stacked and scored in one call.
    ``metric(x (..., n, d), labels, precision=...)`` is D-deepscore unless another is given
    (``ddscore_jax.metrics``); a model's score is its mean over ``blocks``.
    """
    names = list(features)
    if not names:
        return []
    idx = train_indices(len(labels), train_fraction, seed)
    stacked = np.stack([np.stack([np.asarray(features[m][b])[idx] for b in blocks])
                        for m in names])
    per_block = metric(stacked, np.asarray(labels)[idx], precision=precision)
    results = [
        ModelScore(name, float(np.mean(per_block[i])),
                   {b: float(per_block[i, j]) for j, b in enumerate(blocks)})
        for i, name in enumerate(names)
    ]
    return sorted(results, key=lambda r: -r.score)
