"""Baseline transferability metrics, jitted and vectorised over models and blocks like D-deepscore.

Every feature-based metric takes ``features`` of shape (..., n, d) and integer ``labels`` (n,) and
returns one float64 number per leading index, shape ``features.shape[:-2]``; higher means "expected
to transfer better" for all of them. The head-based metrics (LEEP, NCE) take the source classifier's
softmax outputs (..., n, Z) instead of features. Each is written from its paper's definition; the
definitions, the numerical choices and where they differ from the widely copied reference code are
in docs/metrics.md.

As in ``ddscore.py``, one compiled program scores every (model, block) matrix at once (``lax.map``
over the flattened leading axes), in float64 wherever the backend has it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddscore_jax.ddscore import (
    RCOND,
    ModelScore,
    _block_score,
    precision_for,
    train_indices,
)
from ddscore_jax.ddscore import block_scores as ddscore
from ddscore_jax.model import SCORE_BLOCKS
from ddscore_jax.progress import Progress
from ddscore_jax.serial_lapack import map_matrices, single_threaded_blas
from ddscore_jax.settings import ScoreSettings

TRANSRATE_EPS = 1e-4  # the distortion of TransRate's coding rate (eps^2 of the paper, see docs)
LOGME_TOL = 1e-10  # relative change of alpha and beta at which the fixed point counts as reached
LOGME_MAX_ITER = 10_000
GBC_VARIANCE_FLOOR = 1e-4  # stable_transfer's floor on each per-dimension class variance
LOGME_BOUNDARY = 1e-12  # stop when gamma or n - gamma < this * n: a limit, not a point (docs)
KNN_ROW_BLOCK = 512  # rows of the n x n distance matrix held at once, per matrix


class _Labels(NamedTuple):
    """Label encodings shared by every matrix of a batch (built once, outside jit)."""

    onehot: jax.Array  # (n, C) 0/1
    members: jax.Array  # (C, m) row indices of each class, padded with 0; m >= largest class
    member_mask: jax.Array  # (C, m) 1 where ``members`` is a real row


def _encode_labels(labels: np.ndarray, n: int, dtype, *, min_classes: int = 2) -> _Labels:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels {labels.shape} do not match {n} samples")
    classes, index = np.unique(labels, return_inverse=True)
    if len(classes) < min_classes:
        raise ValueError(f"needs at least {min_classes} classes, got {len(classes)}")
    counts = np.bincount(index, minlength=len(classes))
    # Padded to a power of two (at most n) so that new label draws rarely mean a new compilation.
    width = min(n, 1 << int(counts.max() - 1).bit_length())
    members = np.zeros((len(classes), width), dtype=np.int32)
    mask = np.zeros(members.shape, dtype=dtype)
    for c in range(len(classes)):
        rows = np.flatnonzero(index == c)
        members[c, : len(rows)] = rows
        mask[c, : len(rows)] = 1.0
    onehot = np.eye(len(classes), dtype=dtype)[index]
    return _Labels(jnp.asarray(onehot), jnp.asarray(members), jnp.asarray(mask))


_COMPILED_KEEP = 32  # compiled programs kept in memory (one per metric set and shape)
_compiled: OrderedDict[tuple, Callable] = OrderedDict()


def _chained(names: tuple[str, ...], f: jax.Array, lab: _Labels) -> dict:
    """Every metric of ``names`` on one (n, d) matrix, one after the other.

    Each metric's input passes through a barrier with the previous metric's output, so the
    decompositions of one metric start only after the previous metric is done: with
    serial_lapack's one matrix per LAPACK call, at most one decomposition per matrix is in flight
    (the CPU pool deadlock of docs/metrics.md needs two at once).
    """
    out = {}
    x = f
    shared: dict = {}  # decompositions that two metrics of this program both use
    for name in names:
        fn = _PER_MATRIX[name]
        value = fn(x, lab, shared) if fn in _SHARING else fn(x, lab)
        value, x = jax.lax.optimization_barrier((value, f))
        out[name] = value
    return out


@cache
def _program(names: tuple[str, ...]) -> Callable:
    def run(x: jax.Array, labels: _Labels) -> dict:
        # x: (..., n, d). One program for every metric, model and block at once.
        flat = x.reshape((-1, *x.shape[-2:]))
        # lax.map, not vmap: one matrix per LAPACK call (serial_lapack).
        out = map_matrices(partial(_chained, names), flat, labels)
        return jax.tree.map(lambda a: a.reshape(x.shape[:-2] + a.shape[1:]), out)

    return jax.jit(run)


def _compile(names: tuple[str, ...], x: jax.Array, enc: _Labels,
             progress: Progress | None) -> Callable:
    # Explicit ahead-of-time compilation, so that progress can say when it happens: once per
    # set of metrics and shape (and from the on-disk cache when `enable_compilation_cache` is on).
    key = (names, x.shape, str(x.dtype),
           tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(enc)))
    if key in _compiled:
        _compiled.move_to_end(key)
        return _compiled[key]
    what = f"compiling {', '.join(names)} for {x.shape[-2]} x {x.shape[-1]}"
    if progress:
        progress(what, 0, 1)
    compiled = _program(names).lower(x, enc).compile()
    if progress:
        progress(what, 1, 1)
    _compiled[key] = compiled
    while len(_compiled) > _COMPILED_KEEP:
        _compiled.popitem(last=False)
    return compiled


def _run(names: Sequence[str], x: np.ndarray, labels: np.ndarray | None,
         precision: str | None, progress: Progress | None = None) -> dict:
    """Every metric of ``names`` on each (n, d) matrix of ``x`` (..., n, d), in one compiled
    program; ``{name: float64 NumPy of x.shape[:-2] (+ the metric's own trailing axes)}``."""
    names = tuple(names)
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"expected an array of shape (..., n, d), got {x.shape}")
    precision = precision or precision_for()
    dtype = np.float64 if precision == "float64" else np.float32
    single_threaded_blas()
    with jax.enable_x64(precision == "float64"):
        if labels is None:  # a label-free computation (Ledoit-Wolf): one dummy class
            enc = _Labels(jnp.ones((x.shape[-2], 1), dtype), jnp.zeros((1, 1), jnp.int32),
                          jnp.zeros((1, 1), dtype))
        else:
            enc = _encode_labels(labels, x.shape[-2], dtype)
        xj = jnp.asarray(x, dtype)
        program = _compile(names, xj, enc, progress)
        what = f"computing {', '.join(names)}"
        if progress:
            progress(what, 0, 1)
        out = jax.tree.map(lambda a: np.asarray(a, dtype=np.float64), program(xj, enc))
        if progress:
            progress(what, 1, 1)
        return out


# ----------------------------------------------------------------------------------------------
# Shared linear algebra


def _right_svd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Singular values (k,) and right singular vectors (k, d) of x (n, d), k = min(n, d)."""
    n, d = x.shape
    if n > d:
        # QR first: the SVD of the d x d factor has the same singular values and right vectors,
        # and QR keeps the small singular values that a Gram matrix would lose.
        x = jnp.linalg.qr(x, mode="r")
    _, s, vt = jnp.linalg.svd(x, full_matrices=False)
    return s, vt


def _left_svd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Singular values (k,) and left singular vectors (n, k) of x (n, d), k = min(n, d)."""
    n, d = x.shape
    if n > d:
        q, r = jnp.linalg.qr(x, mode="reduced")
        u, s, _ = jnp.linalg.svd(r, full_matrices=False)
        return s, q @ u
    u, s, _ = jnp.linalg.svd(x, full_matrices=False)
    return s, u


def _centred_class_means(f: jax.Array, onehot: jax.Array) -> jax.Array:
    """(C, d): row c is sqrt(n_c) (mean of class c - overall mean).

    ``M^T M`` is n times the covariance of E[f | y] (the matrix whose rows are the class means).
    """
    counts = onehot.sum(axis=0)
    means = (onehot.T @ f) / counts[:, None]
    return jnp.sqrt(counts)[:, None] * (means - f.mean(axis=0))


def _logdet_spd(a: jax.Array) -> jax.Array:
    """log det of each SPD matrix of ``a`` (k, m, m) -> (k,)."""
    # Only ever called on I + (PSD matrix): Cholesky is stable and cheaper than an LU. One matrix
    # per LAPACK call, like every decomposition here (serial_lapack).
    chol = jax.lax.map(jnp.linalg.cholesky, a)
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)


# ----------------------------------------------------------------------------------------------
# H-score (Bao et al. 2019) and its shrinkage version (Ibrahim et al. 2022)


def _class_spectrum(f: jax.Array, lab: _Labels,
                    shared: dict | None = None) -> tuple[jax.Array, jax.Array]:
    """Singular values s (k,) of the centred features and |M v_i|^2 (k,), M the centred class
    means scaled by sqrt(n_c), v_i the right singular vectors. Both H-scores need exactly this;
    ``shared`` lets one program compute it once for both."""
    if shared is not None and "class_spectrum" in shared:
        return shared["class_spectrum"]
    xc = f - f.mean(axis=0)
    s, vt = _right_svd(xc)
    proj = jnp.sum((_centred_class_means(f, lab.onehot) @ vt.T) ** 2, axis=0)
    if shared is not None:
        shared["class_spectrum"] = (s, proj)
    return s, proj


def _hscore_one(f: jax.Array, lab: _Labels, shared: dict | None = None) -> jax.Array:
    # tr(pinv(cov f) cov E[f|y]); the 1/(n-1) of both covariances cancels. In the right-singular
    # basis of the centred features, pinv(cov f) is diagonal: H = sum_i |M v_i|^2 / s_i^2.
    s, proj = _class_spectrum(f, lab, shared)
    s2 = s**2
    keep = s2 > RCOND * s2[0]  # pinv's cut-off, relative to the largest eigenvalue of cov f
    return jnp.sum(jnp.where(keep, proj / jnp.where(keep, s2, 1.0), 0.0))


def _ledoit_wolf_shrinkage(xc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Ledoit-Wolf (2004) shrinkage ``alpha`` and target scale ``mu`` for centred xc (n, d).

    The estimate is ``(1 - alpha) S + alpha mu I`` with ``S = xc^T xc / n`` and ``mu = tr(S) / d``.
    """
    n, d = xc.shape
    gram = xc @ xc.T if n < d else xc.T @ xc  # the smaller Gram: ||S||_F = ||gram||_F / n
    row_sq = jnp.sum(xc**2, axis=1)
    trace = row_sq.sum() / n
    mu = trace / d
    frob2 = jnp.sum(gram**2) / n**2  # ||S||_F^2
    # delta = ||S - mu I||_F^2 / d; beta = mean over samples of ||x x^T - S||_F^2, / (d n).
    delta = frob2 / d - mu**2
    beta = (jnp.sum(row_sq**2) / n - frob2) / (d * n)
    beta = jnp.minimum(beta, delta)
    alpha = jnp.where(beta > 0, beta / jnp.where(delta > 0, delta, 1.0), 0.0)
    return alpha, mu


def _shrinkage_hscore_one(f: jax.Array, lab: _Labels, shared: dict | None = None) -> jax.Array:
    # tr(pinv(cov_alpha f) (1 - alpha) cov E[f|y]) with cov_alpha the Ledoit-Wolf estimate (on the
    # 1/n sample covariance, as LW is defined) and cov E[f|y] divided by n - 1, as the reference
    # code (tllib's regularized_h_score, np.cov) does. In the right-singular basis of the centred
    # features cov_alpha is diagonal: (1 - alpha) s_i^2 / n + alpha mu. Its other eigenvalue,
    # alpha mu on the orthogonal complement, meets no part of cov E[f|y]: the centred class means
    # lie in the row space of the centred features.
    n, _ = f.shape
    xc = f - f.mean(axis=0)
    alpha, mu = _ledoit_wolf_shrinkage(xc)
    s, proj = _class_spectrum(f, lab, shared)
    proj = proj / (n - 1)
    eig = (1.0 - alpha) * s**2 / n + alpha * mu
    keep = eig > RCOND * eig[0]  # eig[0] is the largest: s is sorted descending
    return (1.0 - alpha) * jnp.sum(jnp.where(keep, proj / jnp.where(keep, eig, 1.0), 0.0))


def _ledoit_wolf_one(x: jax.Array, lab: _Labels) -> tuple[jax.Array, jax.Array]:
    del lab
    xc = x - x.mean(axis=0)
    alpha, mu = _ledoit_wolf_shrinkage(xc)
    cov = (1.0 - alpha) * (xc.T @ xc) / x.shape[0] + alpha * mu * jnp.eye(x.shape[1], dtype=x.dtype)
    return cov, alpha


def ledoit_wolf(x: np.ndarray, *, precision: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ledoit-Wolf shrunk covariance of each (n, d) matrix of ``x`` (..., n, d), data centred.

    Returns ``(covariance (..., d, d), shrinkage (...))``, float64; the same estimator as
    ``sklearn.covariance.ledoit_wolf(x, assume_centered=False)``.
    """
    return _run(("_ledoit_wolf",), x, None, precision)["_ledoit_wolf"]


def hscore(features: np.ndarray, labels: np.ndarray, *,
           precision: str | None = None) -> np.ndarray:
    """H-score (Bao et al. 2019) of each (n, d) matrix of ``features``: shape ``shape[:-2]``.

    ``tr(pinv(cov f) cov(E[f | y]))``, centred covariances, pinv cut-off ``RCOND`` relative to the
    largest eigenvalue. When n <= d it is C - 1 for features in general position (see docs).
    """
    return _run(("hscore",), features, labels, precision)["hscore"]


def shrinkage_hscore(features: np.ndarray, labels: np.ndarray, *,
                     precision: str | None = None) -> np.ndarray:
    """Shrinkage H-score (Ibrahim et al. 2022): shape ``features.shape[:-2]``.

    ``tr(pinv(cov_alpha f) (1 - alpha) cov(E[f | y]))`` with the Ledoit-Wolf estimate
    ``cov_alpha = (1 - alpha) cov f + alpha tr(cov f)/d I`` (cov f divided by n) and cov(E[f | y])
    divided by n - 1, as in tllib's ``regularized_h_score``.
    """
    return _run(("shrinkage_hscore",), features, labels, precision)["shrinkage_hscore"]


# ----------------------------------------------------------------------------------------------
# LogME (You et al. 2021)


class LogMEFit(NamedTuple):
    """Per class (one-vs-rest target), shape (..., C): the maximised log evidence (not divided by
    n), the prior precision ``alpha``, the noise precision ``beta``, and the iterations taken."""

    evidence: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    iterations: np.ndarray


def _logme_one(f: jax.Array, lab: _Labels) -> LogMEFit:
    # Model per class c: y_c = f w + noise, w ~ N(0, alpha^-1 I_d), noise ~ N(0, beta^-1 I_n),
    # y_c the 0/1 indicator of class c. Everything is written in the SVD f = U S V^T (k values):
    # z = U^T y, so |m|^2, |y - f m|^2 and log|A| need only s, z and |y|^2.
    n, d = f.shape
    s, u = _left_svd(f)
    k = s.shape[0]
    z = u.T @ lab.onehot  # (k, C)
    # |y - U z|^2, the part of y outside range(f), formed from the residual vector rather than as
    # |y|^2 - |z|^2: beta multiplies it, and beta is huge exactly when it is tiny.
    if k == n:
        perp = jnp.zeros(z.shape[1], f.dtype)
    else:
        perp = jnp.sum((lab.onehot - u @ z) ** 2, axis=0)
    return _logme_from_spectrum(n, d, s, z, perp)


def _logme_from_spectrum(n: int, d: int, s: jax.Array, z: jax.Array, perp: jax.Array,
                         active: jax.Array | None = None) -> LogMEFit:
    """The evidence maximisation of :func:`_logme_one` from the SVD's pieces: singular values
    s (k,), z = U^T y (k, C) and the part of y outside range(f), perp (C,). ``active`` (k,) marks
    the directions that count (default: all); an inactive one is a zero singular value, like the
    d - k beyond the SVD (resample.py so passes the null directions of a weighted Gram)."""
    dtype = s.dtype
    if active is None:
        k = s.shape[0]
        on = 1.0  # multiplies exactly: the published path's numbers are unchanged
    else:
        k = jnp.sum(active)
        on = active[:, None].astype(dtype)
        s = jnp.where(active, s, 0.0)
        z = z * on
    sig = (s**2)[:, None]  # (k, 1) eigenvalues of f^T f (the d - k others are 0)
    tiny = jnp.finfo(dtype).tiny

    def stats(alpha, beta):
        denom = alpha + beta * sig  # (k, C): eigenvalues of A = alpha I + beta f^T f
        m2 = jnp.sum((beta * s[:, None] * z / denom) ** 2, axis=0)  # |m|^2, m = beta A^-1 f^T y
        res = perp + jnp.sum((alpha * z / denom) ** 2, axis=0)  # |y - f m|^2
        gamma = jnp.sum(beta * sig / denom, axis=0)  # effective number of parameters
        # n - gamma written without the cancellation, so it stays exact as beta / alpha grows.
        n_minus_gamma = (n - k) + jnp.sum(on * alpha / denom, axis=0)
        return denom, m2, res, gamma, n_minus_gamma

    def step(state):
        it, alpha, beta, _ = state
        _, m2, res, gamma, n_minus_gamma = stats(alpha, beta)
        new_alpha = gamma / jnp.maximum(m2, tiny)
        new_beta = n_minus_gamma / jnp.maximum(res, tiny)
        change = jnp.maximum(jnp.abs(new_alpha / alpha - 1.0), jnp.abs(new_beta / beta - 1.0))
        # The supremum can lie on the boundary, where the iteration walks off geometrically:
        # beta -> infinity (no noise) when n <= d and f interpolates y well, alpha -> infinity
        # (w = 0) when f explains nothing. Once the noise, or the weights, hold a negligible share
        # of the n degrees of freedom, further steps only rescale one precision and change the
        # evidence by nothing float64 can represent.
        boundary = (n_minus_gamma < LOGME_BOUNDARY * n) | (gamma < LOGME_BOUNDARY * n)
        change = jnp.where(boundary, 0.0, change)
        return it + 1, new_alpha, new_beta, jnp.max(change)

    def not_done(state):
        it, _, _, change = state
        return (it < LOGME_MAX_ITER) & (change > LOGME_TOL)

    ones = jnp.ones(z.shape[1], dtype)
    it, alpha, beta, _ = jax.lax.while_loop(
        not_done, step, (jnp.int32(0), ones, ones, jnp.asarray(jnp.inf, dtype)))
    # The evidence of the final (alpha, beta), with m and the residual recomputed for exactly those
    # values, so it is the exact log marginal likelihood even if the loop stopped early.
    denom, m2, res, _, _ = stats(alpha, beta)
    # log|A| over all d eigenvalues: the k from the SVD plus d - k that equal alpha. The widely
    # copied fixed-point code drops the (d - k) log(alpha) term, which matters when n < d.
    logdet_a = jnp.sum(on * jnp.log(denom), axis=0) + (d - k) * jnp.log(alpha)
    evidence = (n / 2 * jnp.log(beta) + d / 2 * jnp.log(alpha) - n / 2 * math.log(2 * math.pi)
                - beta / 2 * res - alpha / 2 * m2 - logdet_a / 2)
    return LogMEFit(evidence, alpha, beta, jnp.broadcast_to(it, alpha.shape))


def _logme_score_one(f: jax.Array, lab: _Labels) -> jax.Array:
    return jnp.mean(_logme_one(f, lab).evidence) / f.shape[0]


def logme_fit(features: np.ndarray, labels: np.ndarray, *,
              precision: str | None = None) -> LogMEFit:
    """The per-class LogME evidence maximisation behind :func:`logme`; fields of shape (..., C)."""
    fit = _run(("_logme_fit",), features, labels, precision)["_logme_fit"]
    return fit._replace(iterations=fit.iterations.astype(np.int64))


def logme(features: np.ndarray, labels: np.ndarray, *,
          precision: str | None = None) -> np.ndarray:
    """LogME (You et al. 2021): shape ``features.shape[:-2]``.

    The maximised log evidence of a Bayesian linear model from the features to each class's 0/1
    indicator, averaged over classes and divided by n. Raw (uncentred) features, as in the paper.
    """
    return _run(("logme",), features, labels, precision)["logme"]


# ----------------------------------------------------------------------------------------------
# TransRate (Huang et al. 2022)


def _transrate_one(f: jax.Array, lab: _Labels) -> jax.Array:
    # R(Z) - R(Z|Y) with R(Z) = 1/2 logdet(I + Z^T Z / (n eps)) on the centred features and
    # R(Z|Y) = 1/C sum_c R(Z_c), Z_c the rows of class c (centred with the overall mean): the
    # plain mean over classes of the paper's code and tllib, not MCR^2's n_c / n weights.
    n, d = f.shape
    z = f - f.mean(axis=0)
    counts = lab.member_mask.sum(axis=1)  # (C,)
    if n < d:
        # logdet(I_d + Z^T Z) = logdet(I_n + Z Z^T): work on the sample side. Class c's Gram is
        # Z Z^T with the rows and columns of other classes zeroed (they add identity blocks).
        gram = z @ z.T
        mask = lab.onehot.T  # (C, n)
        gram_c = mask[:, :, None] * gram[None] * mask[:, None, :]
    else:
        gram = z.T @ z
        zc = z[lab.members] * lab.member_mask[..., None]  # (C, m, d), padding rows zero
        gram_c = jnp.swapaxes(zc, 1, 2) @ zc
    scaled = jnp.concatenate([gram[None] / (n * TRANSRATE_EPS),
                              gram_c / (counts * TRANSRATE_EPS)[:, None, None]])
    rates = 0.5 * _logdet_spd(jnp.eye(gram.shape[0], dtype=f.dtype) + scaled)
    return rates[0] - jnp.mean(rates[1:])


def transrate(features: np.ndarray, labels: np.ndarray, *,
              precision: str | None = None) -> np.ndarray:
    """TransRate (Huang et al. 2022), coding-rate difference with eps = 1e-4: ``shape[:-2]``.

    ``R(Z) - 1/C sum_c R(Z_c)``, ``R(Z) = 1/2 logdet(I + Z^T Z / (n eps))``, Z the centred
    features (in nats), as the paper's code and tllib compute it. See docs/metrics.md.
    """
    return _run(("transrate",), features, labels, precision)["transrate"]


# ----------------------------------------------------------------------------------------------
# GBC (Pandy et al. 2022)


def _gbc_one(f: jax.Array, lab: _Labels) -> jax.Array:
    # As the authors' code (google-research stable_transfer, gbc.py, spherical): per class the
    # per-dimension variances (1/n_c), each floored at GBC_VARIANCE_FLOOR, averaged into one var_c.
    # Their Bhattacharyya distance, var = (var_i + var_j) / 2, has the log term of a scalar:
    #   D = |mu_i - mu_j|^2 / (8 var) + 1/2 ln(var / sqrt(var_i var_j)),   BC = exp(-D);
    # (the true distance of two d-dimensional spherical Gaussians has d/2 there, see docs);
    # GBC = -sum over ordered pairs i != j of BC (each unordered pair counted twice).
    onehot = lab.onehot
    counts = onehot.sum(axis=0)
    means = (onehot.T @ f) / counts[:, None]  # (C, d)
    # Two-pass variance: subtract each row's class mean before squaring.
    resid = f - onehot @ means
    per_dim = (onehot.T @ resid**2) / counts[:, None]  # (C, d)
    return _gbc_from_moments(means, per_dim)


def _gbc_from_moments(means: jax.Array, per_dim: jax.Array) -> jax.Array:
    """GBC from the class means (C, d) and per-dimension class variances (C, d)."""
    var = jnp.maximum(per_dim, GBC_VARIANCE_FLOOR).mean(axis=1)  # (C,)
    avg = (var[:, None] + var[None, :]) / 2
    sq = jnp.sum((means[:, None, :] - means[None, :, :]) ** 2, axis=-1)
    dist = sq / (8 * avg) + 0.5 * (jnp.log(avg) - 0.5 * (jnp.log(var)[:, None]
                                                          + jnp.log(var)[None, :]))
    bc = jnp.exp(-dist)
    off = 1.0 - jnp.eye(bc.shape[0], dtype=means.dtype)
    return -jnp.sum(bc * off)


def gbc(features: np.ndarray, labels: np.ndarray, *,
        precision: str | None = None) -> np.ndarray:
    """GBC (Pandy et al. 2022), spherical, as the authors' code: ``features.shape[:-2]``.

    Minus the sum over ordered class pairs of ``exp(-D)``, D the authors' Bhattacharyya distance
    between ``N(mean_c, var_c I)``, ``var_c`` the mean of the per-dimension variances of class c
    floored at 1e-4. In [-C(C-1), 0].
    """
    return _run(("gbc",), features, labels, precision)["gbc"]


# ----------------------------------------------------------------------------------------------
# Leave-one-out 1-nearest-neighbour accuracy


def _knn_one(f: jax.Array, lab: _Labels) -> jax.Array:
    n = f.shape[0]
    sq = jnp.sum(f**2, axis=1)
    rows = min(n, KNN_ROW_BLOCK)
    blocks = -(-n // rows)
    idx = jnp.minimum(jnp.arange(blocks * rows), n - 1).reshape(blocks, rows)
    cols = jnp.arange(n)

    # Row blocks bound the memory to (rows, n) per matrix instead of (n, n).
    def nearest(r):
        d2 = sq[r][:, None] + sq[None, :] - 2.0 * (f[r] @ f.T)
        d2 = jnp.where(r[:, None] == cols[None, :], jnp.inf, d2)  # leave the sample itself out
        return jnp.argmin(d2, axis=1)  # ties: the lowest index

    nn = jax.lax.map(nearest, idx).reshape(-1)[:n]
    return jnp.mean(jnp.sum(lab.onehot[nn] * lab.onehot, axis=1))


def knn(features: np.ndarray, labels: np.ndarray, *,
        precision: str | None = None) -> np.ndarray:
    """Leave-one-out 1-NN accuracy (Euclidean) in [0, 1]: shape ``features.shape[:-2]``."""
    return _run(("knn",), features, labels, precision)["knn"]


# ----------------------------------------------------------------------------------------------
# LEEP (Nguyen et al. 2020) and NCE (Tran et al. 2019): functions of the source head's outputs


def _leep_one(p: jax.Array, lab: _Labels) -> jax.Array:
    # p (n, Z): source softmax outputs. Empirical joint P(y, z) = 1/n sum_{i: y_i = y} p_iz,
    # P(y | z) = P(y, z) / P(z); LEEP = 1/n sum_i log sum_z P(y_i | z) p_iz.
    n = p.shape[0]
    joint = lab.onehot.T @ p / n  # (C, Z)
    marg = joint.sum(axis=0)
    # A source class that no sample puts mass on (e.g. padding) contributes nothing.
    cond = jnp.where(marg > 0, joint / jnp.where(marg > 0, marg, 1.0), 0.0)
    eep = jnp.sum((p @ cond.T) * lab.onehot, axis=1)  # (n,)
    return jnp.mean(jnp.log(eep))


def _nce_one(p: jax.Array, lab: _Labels) -> jax.Array:
    # z_i = argmax source class; NCE = -H(Y | Z) = sum_{y,z} P(y, z) log P(y | z), empirical.
    n, nz = p.shape
    src = jax.nn.one_hot(jnp.argmax(p, axis=1), nz, dtype=p.dtype)
    joint = lab.onehot.T @ src / n  # (C, Z)
    marg = joint.sum(axis=0)
    safe = jnp.where(joint > 0, joint, 1.0)
    return jnp.sum(jnp.where(joint > 0, joint * jnp.log(safe / jnp.where(marg > 0, marg, 1.0)),
                             0.0))


def _check_probs(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p)
    if p.ndim < 2:
        raise ValueError(f"expected source probabilities of shape (..., n, Z), got {p.shape}")
    if np.any(p < 0) or not np.allclose(p.sum(axis=-1), 1.0, atol=1e-3):
        raise ValueError("source probabilities must be non-negative and sum to 1 over Z")
    return p


def leep(source_probs: np.ndarray, labels: np.ndarray, *,
         precision: str | None = None) -> np.ndarray:
    """LEEP (Nguyen et al. 2020) from the source head's softmax outputs (..., n, Z).

    Returns shape ``source_probs.shape[:-2]``, a mean log-likelihood (<= 0).
    """
    return _run(("leep",), _check_probs(source_probs), labels, precision)["leep"]


def nce(source_probs: np.ndarray, labels: np.ndarray, *,
        precision: str | None = None) -> np.ndarray:
    """NCE (Tran et al. 2019): minus the empirical conditional entropy H(Y | Z), in nats.

    Z is the argmax of the source head's outputs (..., n, Z). Returns ``source_probs.shape[:-2]``.
    """
    return _run(("nce",), _check_probs(source_probs), labels, precision)["nce"]


# ----------------------------------------------------------------------------------------------
# Registry and model-level scoring


def _ddscore_one(f: jax.Array, lab: _Labels) -> jax.Array:
    return _block_score(f, lab.onehot, RCOND)


# The per-matrix function behind each name; "_"-names are extras, not metrics.
_PER_MATRIX: dict[str, Callable] = {
    "ddscore": _ddscore_one, "hscore": _hscore_one, "shrinkage_hscore": _shrinkage_hscore_one,
    "logme": _logme_score_one, "transrate": _transrate_one, "gbc": _gbc_one, "knn": _knn_one,
    "leep": _leep_one, "nce": _nce_one, "_logme_fit": _logme_one,
    "_ledoit_wolf": _ledoit_wolf_one,
}
_SHARING = {_hscore_one, _shrinkage_hscore_one}  # take the program's ``shared`` decompositions


@dataclass(frozen=True)
class Metric:
    """A transferability metric: ``fn(x, labels, precision=None) -> array of x.shape[:-2]``.

    ``x`` is features (..., n, d) for feature metrics, or the source head's softmax outputs
    (..., n, Z) when ``needs_head``. Higher is better for all of them.
    """

    name: str
    fn: Callable[..., np.ndarray]
    needs_head: bool
    summary: str


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("ddscore", ddscore, False, "D-deepscore: tr(pinv(F) G), uncentred (docs/method.md)"),
    Metric("hscore", hscore, False, "H-score: tr(pinv(cov f) cov E[f|y])"),
    Metric("shrinkage_hscore", shrinkage_hscore, False, "H-score with Ledoit-Wolf cov f"),
    Metric("logme", logme, False, "LogME: max log evidence / n, mean over classes"),
    Metric("transrate", transrate, False, "TransRate: R(Z) - R(Z|Y), eps 1e-4"),
    Metric("gbc", gbc, False, "GBC: -sum of Bhattacharyya coefficients, spherical"),
    Metric("knn", knn, False, "leave-one-out 1-NN accuracy"),
    Metric("leep", leep, True, "LEEP: log expected empirical prediction"),
    Metric("nce", nce, True, "NCE: -H(Y | source argmax)"),
)}


def compute(names: Sequence[str], x: np.ndarray, labels: np.ndarray, *,
            precision: str | None = None, progress: Progress | None = None) -> dict:
    """Several metrics of one kind (all feature metrics, or all head metrics) on each matrix of
    ``x`` (..., n, d), compiled and run as one program: ``{name: array of x.shape[:-2]}``."""
    names = tuple(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    heads = {METRICS[n].needs_head for n in names}
    if len(heads) > 1:
        raise ValueError("feature metrics and head metrics take different inputs: compute "
                         "them in two calls")
    if heads == {True}:
        x = _check_probs(x)
    return _run(names, x, labels, precision, progress)


def stacked_features(features: Mapping[str, Mapping[str, np.ndarray]], blocks: Sequence[str],
                     idx: np.ndarray) -> list[tuple[list[str], np.ndarray]]:
    """The rows ``idx`` of every model's ``blocks``, one (models, blocks, n, d) stack per feature
    shape (a zoo may mix ResNet18 and ResNet50), with the models' names in stack order."""
    groups: dict[tuple, list[str]] = {}
    for name in features:
        groups.setdefault(tuple(np.shape(features[name][b]) for b in blocks), []).append(name)
    return [(names, np.stack([np.stack([np.asarray(features[m][b])[idx] for b in blocks])
                              for m in names])) for names in groups.values()]


def stacked_probs(head_probs: Mapping[str, np.ndarray | None] | None,
                  idx: np.ndarray) -> tuple[list[str], np.ndarray | None]:
    """The rows ``idx`` of the source heads' probabilities of the models that have one, as one
    (models, n, Z) stack (None when none has), with their names in stack order."""
    probs = {n: p for n, p in (head_probs or {}).items() if p is not None}
    if not probs:
        return [], None
    chosen = [_check_probs(p)[idx] for p in probs.values()]
    width = max(p.shape[1] for p in chosen)
    # Zero columns are source classes nobody predicts: they change neither LEEP nor NCE.
    return list(probs), np.stack([np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in chosen])


def score_all(
    features: Mapping[str, Mapping[str, np.ndarray]],
    labels: np.ndarray,
    metrics: Sequence[str],
    *,
    head_probs: Mapping[str, np.ndarray | None] | None = None,
    train_fraction: float = ScoreSettings.train_fraction,
    seed: int = ScoreSettings.seed,
    blocks: Sequence[str] = SCORE_BLOCKS,
    precision: str | None = None,
    progress: Progress | None = None,
) -> dict[str, dict[str, ModelScore]]:
    """Every model under every metric: ``{metric: {model: ModelScore}}``.

    ``features[name][block]`` is (n, d); a feature metric's model score is its mean over
    ``blocks``, with the per-block values in ``block_scores``. ``head_probs[name]`` is the source
    head's softmax output (n, Z) for LEEP/NCE (None, or absent: the model has no such score).
    Every model uses the same seeded split (:func:`ddscore_jax.ddscore.train_indices`). All feature
    metrics run as one compiled program per feature shape (models of one width are stacked), and
    all head metrics as one more.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    labels = np.asarray(labels)
    idx = train_indices(len(labels), train_fraction, seed)
    out: dict[str, dict[str, ModelScore]] = {m: {} for m in metrics}
    feature_metrics = tuple(m for m in metrics if not METRICS[m].needs_head)
    head_metrics = tuple(m for m in metrics if METRICS[m].needs_head)
    if feature_metrics and features:
        for names, stacked in stacked_features(features, blocks, idx):
            values = _run(feature_metrics, stacked, labels[idx], precision, progress)
            for metric in feature_metrics:
                for i, name in enumerate(names):
                    per_block = values[metric][i]
                    out[metric][name] = ModelScore(
                        name, float(np.mean(per_block)),
                        {b: float(per_block[j]) for j, b in enumerate(blocks)})
    names, stacked = stacked_probs(head_probs if head_metrics else None, idx)
    if names:
        values = _run(head_metrics, stacked, labels[idx], precision, progress)
        for metric in head_metrics:
            for i, name in enumerate(names):
                out[metric][name] = ModelScore(name, float(values[metric][i]), {})
    return out


def score_models(
    inputs: Mapping[str, Mapping[str, np.ndarray] | np.ndarray],
    labels: np.ndarray,
    *,
    metric: str,
    train_fraction: float = ScoreSettings.train_fraction,
    seed: int = ScoreSettings.seed,
    blocks: Sequence[str] = SCORE_BLOCKS,
    precision: str | None = None,
) -> list[ModelScore]:
    """Score every model with one metric; returns them ranked, best first.

    For a feature metric ``inputs[name][block]`` is (n, d) and the model's score is the mean over
    ``blocks``; for a head metric ``inputs[name]`` is the source softmax output (n, Z) (Z may differ
    between models) and ``block_scores`` is empty. See :func:`score_all` for several at once.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if METRICS[metric].needs_head:
        got = score_all({}, labels, [metric], head_probs=inputs, train_fraction=train_fraction,
                        seed=seed, blocks=blocks, precision=precision)
    else:
        got = score_all(inputs, labels, [metric], train_fraction=train_fraction, seed=seed,
                        blocks=blocks, precision=precision)
    return sorted(got[metric].values(), key=lambda r: -r.score)
