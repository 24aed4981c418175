"""The published implementations of the baseline metrics, re-expressed in float64 NumPy.

Each function below performs the same arithmetic, with the same constants, stopping rules and
quirks, as the code its comment names (repository, file, commit read); only the array library
(TensorFlow -> NumPy for GBC) and the spelling differ. ``tests/test_metrics.py`` checks
``ddscore_jax.metrics`` against them; run this file to print the table of measured differences
that docs/metrics.md quotes:

    .venv/bin/python tests/reference_metrics.py
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import LedoitWolf

# ----------------------------------------------------------------------------------------------
# GBC: google-research/google-research, stable_transfer/transferability/gbc.py
# (commit 1d4d2f1aa6f2883a790d2ae46a6ee8ab150d8f31), gaussian_type "spherical" (their default).


def gbc_stable_transfer(features: np.ndarray, labels: np.ndarray,
                        gaussian_type: str = "spherical") -> float:
    stats = {}
    for c in np.unique(labels):
        rows = features[labels == c]
        # tf.math.reduce_variance: the 1/n_c variance per dimension, then floored at 1e-4.
        stats[c] = (rows.mean(axis=0), np.maximum(rows.var(axis=0), 1e-4))
    total = 0.0
    for c1 in stats:
        for c2 in stats:
            if c1 == c2:
                continue
            mu1, var1 = stats[c1]
            mu2, var2 = stats[c2]
            if gaussian_type == "spherical":  # one scalar per class: the mean variance
                var1, var2 = np.mean(var1), np.mean(var2)
            avg = (var1 + var2) / 2
            # reduce_sum over the (scalar, when spherical) log-variances: no factor d.
            first = np.sum((mu1 - mu2) ** 2 / avg) / 8
            second = (np.sum(np.log(avg)) - 0.5 * np.sum(np.log(var1))
                      - 0.5 * np.sum(np.log(var2)))
            total += np.exp(-(first + 0.5 * second))
    return -total


# ----------------------------------------------------------------------------------------------
# H-score and shrinkage ("regularized") H-score: thuml/Transfer-Learning-Library,
# tllib/ranking/hscore.py (commit b0d863f20511e60fbc6f5491f37faf2765451cf7).


def _class_mean_rows(f: np.ndarray, y: np.ndarray) -> np.ndarray:
    g = np.zeros_like(f)
    for c in range(int(y.max() + 1)):
        g[y == c] = f[y == c].mean(axis=0)
    return g


def h_score_tllib(features: np.ndarray, labels: np.ndarray) -> float:
    cov_f = np.cov(features, rowvar=False)
    cov_g = np.cov(_class_mean_rows(features, labels), rowvar=False)
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-15) @ cov_g))


def regularized_h_score_tllib(features: np.ndarray, labels: np.ndarray) -> float:
    f = features.astype(np.float64)
    f = f - f.mean(axis=0, keepdims=True)
    lw = LedoitWolf(assume_centered=False).fit(f)  # covariance_ divides by n
    cov_g = np.cov(_class_mean_rows(f, labels), rowvar=False)  # divides by n - 1
    return float(np.trace(np.linalg.pinv(lw.covariance_, rcond=1e-15)
                          @ ((1 - lw.shrinkage_) * cov_g)))


# ----------------------------------------------------------------------------------------------
# TransRate: thuml/Transfer-Learning-Library, tllib/ranking/transrate.py
# (commit 4cc0d9150b6163e3ec1f42124c1e65b46f513475); the same as the snippet in the paper.


def _coding_rate(z: np.ndarray, eps: float) -> float:
    n, d = z.shape
    return 0.5 * np.linalg.slogdet(np.eye(d) + z.T @ z / (n * eps))[1]


def transrate_tllib(features: np.ndarray, labels: np.ndarray, eps: float = 1e-4) -> float:
    z = features - features.mean(axis=0, keepdims=True)
    classes = int(labels.max() + 1)
    conditional = sum(_coding_rate(z[labels == c], eps) for c in range(classes))
    return _coding_rate(z, eps) - conditional / classes  # plain mean over classes


# ----------------------------------------------------------------------------------------------
# LogME: thuml/LogME, LogME.py (commit 3a0895084badc924dce3eb049580100bf7258f42),
# LogME.fit for classification, i.e. _fit_fixed_point (with truncated_svd when N > D).


def _truncated_svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # The SVD of the D x D Gram matrix, singular values above 1e-10 (absolute) kept.
    _, s2, vh = np.linalg.svd(x.T @ x)
    s = np.sqrt(s2)
    k = int(np.sum(s > 1e-10))
    u = (x @ vh.T)[:, :k] / s[:k].reshape(1, -1)
    return u, s[:k].reshape(-1, 1), vh[:k]


def logme_thuml(features: np.ndarray, labels: np.ndarray) -> float:
    f = features.astype(np.float64)
    n, d = f.shape
    if n > d:
        u, s, _ = _truncated_svd(f)
    else:
        u, s, _ = np.linalg.svd(f, full_matrices=False)
        s = s.reshape(-1, 1)
    sigma = s**2
    evidences = []
    for c in range(int(labels.max() + 1)):
        t = (labels == c).astype(np.float64).reshape(-1, 1)
        x2 = (u.T @ t) ** 2
        res_x2 = (t**2).sum() - x2.sum()
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            lam = alpha / beta
            gamma = (sigma / (sigma + lam)).sum()
            m2 = (sigma * x2 / ((lam + sigma) ** 2)).sum()
            res2 = (x2 / ((1 + sigma / lam) ** 2)).sum() + res_x2
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - lam) / lam <= 1e-3:
                break
        # The new (alpha, beta) with the m2 and res2 of the previous ones; log|A| over the k
        # computed eigenvalues only (see docs/metrics.md for n < d).
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta)
                    - 0.5 * np.sum(np.log(alpha + beta * sigma)) - beta / 2 * res2
                    - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


# ----------------------------------------------------------------------------------------------
# LEEP and NCE: thuml/Transfer-Learning-Library, tllib/ranking/leep.py
# (commit 83d900556472e70aaad06211b635a7693c26353b) and tllib/ranking/nce.py
# (commit 56ccfd7416b21b95351dffacc2aab1fe30f68561). thuml/LogME's LEEP.py is the same
# computation; its NCE.py cannot run (np.zeros(C_t, C_s)), tllib's is the fixed copy.


def leep_tllib(source_probs: np.ndarray, labels: np.ndarray) -> float:
    n, z = source_probs.shape
    joint = np.zeros((int(labels.max() + 1), z))
    for c in range(joint.shape[0]):
        joint[c] = (source_probs[labels == c] / float(n)).sum(axis=0)
    given_source = (joint / joint.sum(axis=0, keepdims=True)).T  # P(y | z), (Z, C)
    predicted = source_probs @ given_source
    return float(np.mean(np.log([row[c] for row, c in zip(predicted, labels, strict=True)])))


def nce_tllib(source_labels: np.ndarray, labels: np.ndarray) -> float:
    n = len(source_labels)
    joint = np.zeros((int(labels.max() + 1), int(source_labels.max() + 1)))
    for s, t in zip(source_labels, labels, strict=True):
        joint[int(t), int(s)] += 1.0 / n
    p_z = joint.sum(axis=0, keepdims=True)
    mask = p_z.reshape(-1) != 0
    with np.errstate(invalid="ignore", divide="ignore"):
        given_source = (joint / p_z).T[mask] + 1e-20
    entropy = np.sum(-given_source * np.log(given_source), axis=1, keepdims=True)
    return float(-np.sum(entropy * p_z.reshape(-1, 1)[mask]))


REFERENCES = {
    "gbc": gbc_stable_transfer,
    "hscore": h_score_tllib,
    "shrinkage_hscore": regularized_h_score_tllib,
    "transrate": transrate_tllib,
    "logme": logme_thuml,
}


# ----------------------------------------------------------------------------------------------
# The measurement behind docs/metrics.md's table of differences.


def relu_features(rng: np.random.Generator, n: int, d: int, labels: np.ndarray,
                  shift: float = 0.7) -> np.ndarray:
    """Uncentred, ReLU-like features with a class signal and an unequal spectrum (n, d)."""
    means = shift * rng.normal(size=(labels.max() + 1, d))
    f = rng.normal(size=(n, d)) * np.linspace(1.0, 0.2, d) + means[labels] + 1.5
    return np.abs(f)


def unequal_labels(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    """Labels 0..c-1, every class present, unequal class sizes."""
    return rng.permutation(np.concatenate([np.arange(c), rng.integers(0, c, size=n - c)]))


def _gbc_true_distance(features: np.ndarray, labels: np.ndarray) -> float:
    # The paper's distance between spherical Gaussians (d/2 on the log term), no variance floor:
    # what ddscore_jax computed before it followed stable_transfer.
    d = features.shape[1]
    stats = {c: (features[labels == c].mean(axis=0), features[labels == c].var(axis=0).mean())
             for c in np.unique(labels)}
    total = 0.0
    for c1, (mu1, v1) in stats.items():
        for c2, (mu2, v2) in stats.items():
            if c1 != c2:
                v = (v1 + v2) / 2
                dist = np.sum((mu1 - mu2) ** 2) / (8 * v) + d / 2 * np.log(v / np.sqrt(v1 * v2))
                total += np.exp(-dist)
    return -total


def _transrate_weighted(features: np.ndarray, labels: np.ndarray, eps: float = 1e-4) -> float:
    # MCR^2's n_c / n class weights: what ddscore_jax computed before it followed tllib.
    z = features - features.mean(axis=0, keepdims=True)
    n = len(labels)
    return _coding_rate(z, eps) - sum((labels == c).sum() / n * _coding_rate(z[labels == c], eps)
                                      for c in np.unique(labels))


def _table() -> None:
    from ddscore_jax import metrics

    cases = [(60, 12, 3), (300, 256, 6), (600, 256, 6), (24, 40, 2), (100, 256, 6),
             (200, 256, 2)]
    rows: dict[str, list[str]] = {}
    logme_gap = []
    for k, (n, d, c) in enumerate(cases):
        rng = np.random.default_rng(k)
        y = unequal_labels(rng, n, c)
        balanced = rng.permutation(np.arange(n) % c)
        fs = np.stack([relu_features(rng, n, d, y) for _ in range(3)])
        for name, ref in REFERENCES.items():
            if name == "logme" and n <= d:
                continue
            ours = metrics.METRICS[name].fn(fs, y)
            theirs = np.array([ref(f, y) for f in fs])
            rel = np.max(np.abs(ours - theirs) / np.abs(theirs))
            rows.setdefault(name, []).append(f"{rel:.0e} (n={n}, d={d})")
        if n <= d:
            ours = metrics.logme(fs, y)
            theirs = np.array([logme_thuml(f, y) for f in fs])
            gap = theirs - ours
            logme_gap.append(f"{gap.min():.2f} to {gap.max():.2f} (n={n}, d={d})")
        for name, previous, ref in (("gbc, before (true distance, no floor)", _gbc_true_distance,
                                     gbc_stable_transfer),
                                    ("transrate, before (n_c / n weights)", _transrate_weighted,
                                     transrate_tllib)):
            rel = max(abs(previous(f, y) - ref(f, y)) / abs(ref(f, y)) for f in fs)
            rows.setdefault(name, []).append(f"{rel:.0e} (n={n}, d={d})")
        fb = relu_features(rng, n, d, balanced)
        ours, theirs = metrics.transrate(fb, balanced), transrate_tllib(fb, balanced)
        rows.setdefault("transrate, balanced classes", []).append(
            f"{abs(ours - theirs) / abs(theirs):.0e} (n={n}, d={d})")
    for name, cells in rows.items():
        print(f"| {name} | {'; '.join(cells)} |")
    print(f"| LogME, n <= d: the published value minus ours, nats per sample | "
          f"{'; '.join(logme_gap)} |")


if __name__ == "__main__":
    _table()
