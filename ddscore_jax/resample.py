"""The stratified bootstrap behind every interval of a ranking (docs/uncertainty.md).

The point score of a model is a statistic of the scored images (the seeded ``--train-fraction``
subset, :func:`ddscore_jax.ddscore.train_indices`). Each replicate redraws that subset: every
class, with replacement, to its own size, so a replicate has the same images per class as the
score itself. All models are scored on the same replicates, so the differences between two models
are paired. From the replicates come, per model and metric, a 95% interval of the score, of its
rank, P(rank 1), and whether it belongs to the leader's group (:class:`Uncertainty`).

A replicate is a count vector ``w`` (how often each scored image was drawn): every metric is
written as a function of ``w``, never of gathered rows. D-deepscore needs only the d x d Gram
matrix ``f^T diag(w) f`` and the weighted class sums; the H-scores, LogME and TransRate their
weighted (centred) Gram matrices; GBC, LEEP and NCE weighted moments. 1-NN accuracy leaves out
every copy of the image itself (a duplicate would otherwise be its own nearest neighbour, at
distance 0), so its replicate is the leave-one-*image*-out accuracy weighted by ``w``. The tests
check each form against the metric computed on explicitly resampled rows.

Every replicate of every (model, block) runs in one compiled program, float64 where the backend
has it. It maps over the matrices and the replicates with ``lax.map``, not ``vmap``: a batched
CPU decomposition can deadlock (ddscore_jax/serial_lapack.py).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np

from ddscore_jax.ddscore import Uncertainty, precision_for, train_indices
from ddscore_jax.metrics import (
    METRICS,
    RCOND,
    TRANSRATE_EPS,
    _encode_labels,
    _gbc_from_moments,
    _Labels,
    _logdet_spd,
    _logme_from_spectrum,
    stacked_features,
    stacked_probs,
)
from ddscore_jax.model import SCORE_BLOCKS
from ddscore_jax.progress import Progress
from ddscore_jax.serial_lapack import map_matrices, single_threaded_blas
from ddscore_jax.settings import CONFIDENCE

log = logging.getLogger(__name__)

# Keeps the bootstrap's random stream apart from the train split's, which the same seed draws.
_STREAM = 0xB007
# Directions of a weighted Gram matrix below this share of its largest eigenvalue are its null
# space (float64 rounding of the Gram is ~1e-16 of it); LogME treats them as zero singular values.
NULL_SHARE = 1e-12


def bootstrap_counts(labels: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) int32: how often each of the n images is drawn in each replicate.

    Stratified: each class is drawn with replacement to its own size, so every replicate has the
    class counts of ``labels``. Seeded: the same (labels, resamples, seed) give the same array.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    rng = np.random.default_rng([seed, _STREAM])
    counts = np.zeros((resamples, n), np.int32)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        draws = rng.integers(0, len(rows), size=(resamples, len(rows)))
        flat = (draws + np.arange(resamples)[:, None] * len(rows)).ravel()
        counts[:, rows] = np.bincount(flat, minlength=resamples * len(rows)).reshape(
            resamples, len(rows))
    return counts


# ----------------------------------------------------------------------------------------------
# Weighted forms: fn(f (n, d), w (n,), labels, pre) -> value, pre from the matrix alone


def _desc_eigh(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
    vals, vecs = jnp.linalg.eigh(gram)
    return jnp.maximum(vals[::-1], 0.0), vecs[:, ::-1]


def _w_ddscore(f, w, lab: _Labels, pre) -> jax.Array:
    # ddscore._block_score with the Gram's eigenvalues for f's squared singular values.
    n, d = f.shape
    wf = f * w[:, None]
    if n < d:  # the same non-zero eigenvalues, from the smaller Gram (W^1/2 f f^T W^1/2)
        rf = f * jnp.sqrt(w)[:, None]
        gram = rf @ rf.T
    else:
        gram = wf.T @ f
    sf2 = jnp.maximum(jnp.linalg.eigvalsh(gram)[::-1], 0.0)
    counts = lab.onehot.T @ w
    scaled = (lab.onehot.T @ wf) / jnp.sqrt(jnp.maximum(counts, 1.0))[:, None]
    sg2 = jnp.linalg.svd(scaled, compute_uv=False) ** 2
    k = min(sg2.shape[0], d, n)
    keep = sf2[:k] > RCOND * sf2[0]
    return jnp.sum(jnp.where(keep, sg2[:k] / jnp.where(keep, sf2[:k], 1.0), 0.0))


def _w_centred(f, w, lab: _Labels):
    # The weighted mean, centred rows, their Gram's spectrum, |M v_i|^2 (as _class_spectrum).
    n = f.shape[0]
    mean = (w @ f) / n
    xc = f - mean
    gram = (xc * w[:, None]).T @ xc
    s2, vecs = _desc_eigh(gram)
    counts = lab.onehot.T @ w
    means = (lab.onehot.T @ (f * w[:, None])) / counts[:, None]
    m = jnp.sqrt(counts)[:, None] * (means - mean)
    proj = jnp.sum((m @ vecs) ** 2, axis=0)
    return xc, gram, s2, proj


def _w_hscore(f, w, lab: _Labels, pre) -> jax.Array:
    _, _, s2, proj = _w_centred(f, w, lab)
    keep = s2 > RCOND * s2[0]
    return jnp.sum(jnp.where(keep, proj / jnp.where(keep, s2, 1.0), 0.0))


def _w_shrinkage_hscore(f, w, lab: _Labels, pre) -> jax.Array:
    # metrics._ledoit_wolf_shrinkage and _shrinkage_hscore_one on the weighted sample.
    n, d = f.shape
    xc, gram, s2, proj = _w_centred(f, w, lab)
    row_sq = jnp.sum(xc**2, axis=1)
    mu = (w @ row_sq) / n / d
    frob2 = jnp.sum(gram**2) / n**2
    delta = frob2 / d - mu**2
    beta = jnp.minimum(((w @ row_sq**2) / n - frob2) / (d * n), delta)
    alpha = jnp.where(beta > 0, beta / jnp.where(delta > 0, delta, 1.0), 0.0)
    eig = (1.0 - alpha) * s2 / n + alpha * mu
    keep = eig > RCOND * eig[0]
    return (1.0 - alpha) * jnp.sum(jnp.where(keep, proj / (n - 1) / jnp.where(keep, eig, 1.0),
                                             0.0))


def _w_logme(f, w, lab: _Labels, pre) -> jax.Array:
    # metrics._logme_one in the eigenbasis of f^T W f: z = S^-1 V^T f^T W y, and the part of y
    # outside the range formed from the weighted residual (as _logme_one forms it from rows).
    n, d = f.shape
    wf = f * w[:, None]
    sig, vecs = _desc_eigh(wf.T @ f)
    active = sig > NULL_SHARE * sig[0]
    s = jnp.sqrt(jnp.where(active, sig, 1.0))
    z = jnp.where(active[:, None], (vecs.T @ (wf.T @ lab.onehot)) / s[:, None], 0.0)
    fitted = f @ (vecs @ jnp.where(active[:, None], z / s[:, None], 0.0))
    perp = w @ (lab.onehot - fitted) ** 2
    fit = _logme_from_spectrum(n, d, s, z, perp, active)
    # With d or fewer distinct images drawn, duplicated rows are fitted exactly: the evidence then
    # grows without bound as the noise precision does, and where the fixed point stops is
    # rounding, not a score. Such a replicate has none (NaN), and the model no LogME interval.
    return jnp.where(jnp.sum(w > 0) > d, jnp.mean(fit.evidence) / n, jnp.nan)


def _w_transrate(f, w, lab: _Labels, pre) -> jax.Array:
    # metrics._transrate_one with every row's contribution weighted, on the smaller side.
    n, d = f.shape
    z = f - (w @ f) / n
    counts = lab.onehot.T @ w
    if n < d:
        # logdet(I_d + Z^T W Z) = logdet(I_n + W^1/2 Z Z^T W^1/2); class c: its rows only.
        root = jnp.sqrt(w)
        gram = root[:, None] * (z @ z.T) * root[None, :]
        mask = lab.onehot.T  # (C, n)
        gram_c = mask[:, :, None] * gram[None] * mask[:, None, :]
        size = n
    else:
        gram = (z * w[:, None]).T @ z
        zc = z[lab.members] * lab.member_mask[..., None]  # (C, m, d), padding rows zero
        gram_c = jnp.swapaxes(zc * w[lab.members][..., None], 1, 2) @ zc
        size = d
    scaled = jnp.concatenate([gram[None] / (n * TRANSRATE_EPS),
                              gram_c / (counts * TRANSRATE_EPS)[:, None, None]])
    rates = 0.5 * _logdet_spd(jnp.eye(size, dtype=f.dtype) + scaled)
    return rates[0] - jnp.mean(rates[1:])


def _w_gbc(f, w, lab: _Labels, pre) -> jax.Array:
    counts = lab.onehot.T @ w
    means = (lab.onehot.T @ (f * w[:, None])) / counts[:, None]
    resid = f - lab.onehot @ means
    per_dim = (lab.onehot.T @ (w[:, None] * resid**2)) / counts[:, None]
    return _gbc_from_moments(means, per_dim)


def _knn_distances(f, lab: _Labels) -> jax.Array:
    # The n x n squared distances, each image's own at infinity, computed once per matrix.
    sq = jnp.sum(f**2, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (f @ f.T)
    return jnp.where(jnp.eye(f.shape[0], dtype=bool), jnp.inf, d2)


def _w_knn(f, w, lab: _Labels, pre) -> jax.Array:
    # Nearest neighbour among the other images drawn (never a copy of itself); ties: the lowest
    # index, as metrics._knn_one.
    drawn = jnp.where(w[None, :] > 0, pre, jnp.inf)  # pre: _knn_distances
    nn = jnp.argmin(drawn, axis=1)
    hit = jnp.sum(lab.onehot[nn] * lab.onehot, axis=1)
    return (w @ hit) / f.shape[0]


def _w_leep(p, w, lab: _Labels, pre) -> jax.Array:
    n = p.shape[0]
    joint = lab.onehot.T @ (p * w[:, None]) / n
    marg = joint.sum(axis=0)
    cond = jnp.where(marg > 0, joint / jnp.where(marg > 0, marg, 1.0), 0.0)
    eep = jnp.sum((p @ cond.T) * lab.onehot, axis=1)
    # An image not drawn has weight 0: its log is never needed, and must not make a 0 * -inf.
    return (w @ jnp.where(w > 0, jnp.log(jnp.where(w > 0, eep, 1.0)), 0.0)) / n


def _w_nce(p, w, lab: _Labels, pre) -> jax.Array:
    n, nz = p.shape
    src = jax.nn.one_hot(jnp.argmax(p, axis=1), nz, dtype=p.dtype)
    joint = lab.onehot.T @ (src * w[:, None]) / n
    marg = joint.sum(axis=0)
    safe = jnp.where(joint > 0, joint, 1.0)
    return jnp.sum(jnp.where(joint > 0, joint * jnp.log(safe / jnp.where(marg > 0, marg, 1.0)),
                             0.0))


_WEIGHTED: dict[str, Callable] = {
    "ddscore": _w_ddscore, "hscore": _w_hscore, "shrinkage_hscore": _w_shrinkage_hscore,
    "logme": _w_logme, "transrate": _w_transrate, "gbc": _w_gbc, "knn": _w_knn,
    "leep": _w_leep, "nce": _w_nce,
}
_PRE: dict[str, Callable] = {"knn": _knn_distances}
assert set(_WEIGHTED) == set(METRICS), "every metric needs its weighted form"


def _one_matrix(names: tuple[str, ...], f, weights, lab: _Labels) -> dict:
    # Every replicate of every metric on one matrix, metrics one after another: the barrier keeps
    # at most one decomposition per matrix in flight (metrics._chained says why).
    out = {}
    x = f
    for name in names:
        pre = _PRE[name](x, lab) if name in _PRE else None
        fn = partial(_WEIGHTED[name], x, lab=lab, pre=pre)
        values = jax.lax.map(lambda w, fn=fn: fn(w=w), weights)
        values, x = jax.lax.optimization_barrier((values, f))
        out[name] = values
    return out


@cache
def _program(names: tuple[str, ...]) -> Callable:
    def run(x, weights, lab: _Labels) -> dict:
        # x (..., n, d), weights (R, n) -> {name: (..., R)}
        flat = x.reshape((-1, *x.shape[-2:]))
        out = map_matrices(partial(_one_matrix, names), flat, weights, lab)
        return {k: v.reshape(x.shape[:-2] + v.shape[1:]) for k, v in out.items()}

    return jax.jit(run)


_COMPILED_KEEP = 16
_compiled: OrderedDict[tuple, Callable] = OrderedDict()


def replicate_scores(names: Sequence[str], x: np.ndarray, labels: np.ndarray,
                     counts: np.ndarray, *, precision: str | None = None,
                     progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Each metric of ``names`` (all of one kind: features, or head outputs) on every bootstrap
    replicate ``counts`` (R, n) of each matrix of ``x`` (..., n, d): ``{name: (..., R)}``."""
    names = tuple(names)
    x = np.asarray(x)
    precision = precision or precision_for()
    dtype = np.float64 if precision == "float64" else np.float32
    single_threaded_blas()
    with jax.enable_x64(precision == "float64"):
        enc = _encode_labels(labels, x.shape[-2], dtype)
        xj, wj = jnp.asarray(x, dtype), jnp.asarray(counts, dtype)
        key = (names, xj.shape, wj.shape, str(xj.dtype),
               tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(enc)))
        what = f"resampling {', '.join(names)}: {counts.shape[0]} replicates"
        if progress:
            progress(what, 0, 2)
        program = _compiled.get(key)
        if program is None:
            program = _program(names).lower(xj, wj, enc).compile()
            _compiled[key] = program
            while len(_compiled) > _COMPILED_KEEP:
                _compiled.popitem(last=False)
        if progress:
            progress(what, 1, 2)
        out = {k: np.asarray(v, np.float64) for k, v in program(xj, wj, enc).items()}
        if progress:
            progress(what, 2, 2)
        return out


# ----------------------------------------------------------------------------------------------
# From replicates to intervals


def summarise(replicates: Mapping[str, np.ndarray], points: Mapping[str, float],
              confidence: float = CONFIDENCE) -> dict[str, Uncertainty]:
    """Per model: the intervals of its score and rank, P(best) and the leader's group, from its
    scores on the replicates (``replicates[name]`` (R,), the same replicates for every model)
    and its point score (the leader is the best point score; the first of equals).

    Each model's replicates are first centred on its point score (shifted by point - their
    median): a replicate holds ~63% distinct images, and most metrics score such a sample higher
    than the sample itself, by an offset that differs between models (docs/uncertainty.md). The
    spread and the pairing are kept; the offset, which no other sample of the user's size would
    show, is not."""
    names = list(replicates)
    if not names:
        return {}
    lo_q, hi_q = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    point = np.array([points[m] for m in names], dtype=np.float64)
    raw = np.stack([np.asarray(replicates[m], np.float64) for m in names])  # (M, R)
    shift = np.where(np.isnan(point), 0.0, point - np.nanmedian(raw, axis=1))
    centred = raw + shift[:, None]
    # A replicate a model cannot score (NaN) ranks it last there.
    table = np.nan_to_num(centred, nan=-np.inf)
    best = table.max(axis=0)
    at_best = table == best
    p_best = (at_best / at_best.sum(axis=0)).mean(axis=1)
    # Rank 1 + the number of models strictly better: equals share the better rank.
    ranks = 1 + (table[None, :, :] > table[:, None, :]).sum(axis=1)  # (M, R)
    leader = int(np.argmax(np.nan_to_num(point, nan=-np.inf)))
    out = {}
    for i, name in enumerate(names):
        scores = centred[i]
        diff = table[leader] - table[i]
        tied = i == leader or bool(np.percentile(diff, lo_q) <= 0 <= np.percentile(diff, hi_q))
        out[name] = Uncertainty(
            (float(np.percentile(scores, lo_q)), float(np.percentile(scores, hi_q))),
            (int(np.percentile(ranks[i], lo_q, method="lower")),
             int(np.percentile(ranks[i], hi_q, method="higher"))),
            float(p_best[i]), tied)
    return out


def uncertainty(
    features: Mapping[str, Mapping[str, np.ndarray]],
    labels: np.ndarray,
    metrics: Sequence[str],
    points: Mapping[str, Mapping[str, float]],
    *,
    resamples: int,
    train_fraction: float,
    seed: int,
    head_probs: Mapping[str, np.ndarray | None] | None = None,
    blocks: Sequence[str] = SCORE_BLOCKS,
    precision: str | None = None,
    progress: Progress | None = None,
) -> dict[str, dict[str, Uncertainty]]:
    """``{metric: {model: Uncertainty}}`` for every metric and every model that has it.

    The inputs are those of :func:`ddscore_jax.metrics.score_all`; ``points[metric][model]`` is
    the point score. The replicates redraw the scored subset (``train_fraction``, ``seed``), and
    are drawn from ``seed`` too. A feature metric's replicate score is the mean over ``blocks``,
    as the point score is.
    """
    labels = np.asarray(labels)
    idx = train_indices(len(labels), train_fraction, seed)
    counts = bootstrap_counts(labels[idx], resamples, seed)
    per_model: dict[str, dict[str, np.ndarray]] = {m: {} for m in metrics}
    feature_metrics = tuple(m for m in metrics if not METRICS[m].needs_head)
    head_metrics = tuple(m for m in metrics if METRICS[m].needs_head)
    if feature_metrics and features:
        for names, stacked in stacked_features(features, blocks, idx):
            values = replicate_scores(feature_metrics, stacked, labels[idx], counts,
                                      precision=precision, progress=progress)
            for metric in feature_metrics:
                for i, name in enumerate(names):
                    per_model[metric][name] = values[metric][i].mean(axis=0)
    names, stacked = stacked_probs(head_probs if head_metrics else None, idx)
    if names:
        values = replicate_scores(head_metrics, stacked, labels[idx], counts,
                                  precision=precision, progress=progress)
        for metric in head_metrics:
            for i, name in enumerate(names):
                per_model[metric][name] = values[metric][i]
    out = {}
    for m in metrics:
        # A model with a replicate its metric cannot score (LogME on a sample of d or fewer
        # distinct images) gets no interval for it, rather than one over the lucky replicates.
        bad = [n for n, v in per_model[m].items() if not np.isfinite(v).all()]
        for n in bad:
            del per_model[m][n]
        if bad:
            log.warning("%s: no interval for %s: some bootstrap replicates have no score (%s "
                        "needs more distinct images than feature dimensions)", m,
                        ", ".join(bad), m)
        out[m] = summarise(per_model[m], {n: points[m][n] for n in per_model[m]})
    return out
