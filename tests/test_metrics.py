"""The baseline metrics against direct float64 NumPy/SciPy/sklearn implementations of their papers'
definitions and against the published implementations (tests/reference_metrics.py), on random
data: n > d and n < d, two and several classes, batched over leading axes.

Few distinct array shapes on purpose: every (metric, shape) pair is one XLA compilation.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_metrics import (
    gbc_stable_transfer,
    h_score_tllib,
    leep_tllib,
    logme_thuml,
    nce_tllib,
    regularized_h_score_tllib,
    transrate_tllib,
)
from scipy import integrate, stats
from scipy.spatial.distance import cdist
from sklearn.covariance import ledoit_wolf as sk_ledoit_wolf
from sklearn.metrics import mutual_info_score

from ddscore_jax import metrics
from ddscore_jax.ddscore import RCOND

FEATURE_METRICS = ("hscore", "shrinkage_hscore", "logme", "transrate", "gbc", "knn")


def _features(rng, lead, n, d, labels, shift=0.7):
    """Uncentred, ReLU-like features with a class signal and an unequal spectrum: (*lead, n, d)."""
    c = labels.max() + 1
    means = shift * rng.normal(size=(*lead, c, d))
    scales = np.linspace(1.0, 0.2, d)
    f = rng.normal(size=(*lead, n, d)) * scales + np.take(means, labels, axis=-2) + 1.5
    return np.abs(f)


def _labels(rng, n, c):
    """Labels 0..c-1, every class present, unequal class sizes."""
    y = np.concatenate([np.arange(c), rng.integers(0, c, size=n - c)])
    return rng.permutation(y)


# Three cases: n > d with 3 classes, n < d with 2 classes, n < d with 5 classes.
CASES = {
    "n>d,C=3": ((2, 3), 60, 12, 3),
    "n<d,C=2": ((2,), 24, 40, 2),
    "n<d,C=5": ((2,), 30, 50, 5),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    lead, n, d, c = CASES[request.param]
    rng = np.random.default_rng(100 + list(CASES).index(request.param))
    y = _labels(rng, n, c)
    return _features(rng, lead, n, d, y), y


def _each(x):
    """Iterate over the (n, d) matrices of x (..., n, d) with their leading index."""
    for idx in np.ndindex(x.shape[:-2]):
        yield idx, x[idx]


# ----------------------------------------------------------------------------------------------
# Direct reference implementations (float64 NumPy), written from the definitions


def hscore_ref(f, y):
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(axis=0)
    cov_f = np.cov(f, rowvar=False)
    cov_g = np.cov(g, rowvar=False)
    return np.trace(np.linalg.pinv(cov_f, rtol=RCOND, hermitian=True) @ cov_g)


def shrinkage_hscore_ref(f, y):
    cov_a, alpha = sk_ledoit_wolf(f)
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(axis=0)
    cov_g = np.cov(g, rowvar=False)  # 1/(n - 1), as tllib; cov_a divides by n (Ledoit-Wolf)
    return np.trace(np.linalg.pinv(cov_a, rtol=RCOND, hermitian=True) @ ((1 - alpha) * cov_g))


def coding_rate_ref(z, eps):
    n, d = z.shape
    sign, logdet = np.linalg.slogdet(np.eye(d) + z.T @ z / (n * eps))
    assert sign > 0
    return 0.5 * logdet


def transrate_ref(f, y, eps=1e-4):
    z = f - f.mean(axis=0)
    r_zy = np.mean([coding_rate_ref(z[y == c], eps) for c in np.unique(y)])  # 1/C, as published
    return coding_rate_ref(z, eps) - r_zy


def bhattacharyya_ref(mu1, cov1, mu2, cov2):
    """The general Gaussian Bhattacharyya distance, full matrices and slogdet."""
    cov = (cov1 + cov2) / 2
    diff = mu1 - mu2
    logdets = [np.linalg.slogdet(c)[1] for c in (cov, cov1, cov2)]
    return diff @ np.linalg.solve(cov, diff) / 8 + 0.5 * (logdets[0] - 0.5 * (logdets[1]
                                                                              + logdets[2]))


def gbc_ref(f, y):
    # The authors' spherical GBC through the general Gaussian Bhattacharyya distance: Sigma_c =
    # var_c I (var_c the mean of the floored per-dimension variances) and slogdet, whose log term
    # is then scaled by 1/d (their scalar reduce_sum; see docs/metrics.md).
    d = f.shape[1]
    classes = np.unique(y)
    stats_ = {c: (f[y == c].mean(axis=0),
                  np.maximum(np.var(f[y == c], axis=0), 1e-4).mean() * np.eye(d))
              for c in classes}
    total = 0.0
    for a in classes:
        for b in classes:
            if a != b:
                (mu1, cov1), (mu2, cov2) = stats_[a], stats_[b]
                full = bhattacharyya_ref(mu1, cov1, mu2, cov2)
                maha = (mu1 - mu2) @ np.linalg.solve((cov1 + cov2) / 2, mu1 - mu2) / 8
                total += np.exp(-(maha + (full - maha) / d))
    return -total


def knn_ref(f, y):
    dist = cdist(f, f)  # exact differences, not the Gram-matrix form
    np.fill_diagonal(dist, np.inf)
    return np.mean(y[np.argmin(dist, axis=1)] == y)


def exact_log_evidence(f, t, alpha, beta):
    """log N(t | 0, beta^-1 I + alpha^-1 f f^T), dense n x n float64."""
    n = f.shape[0]
    cov = np.eye(n) / beta + f @ f.T / alpha
    sign, logdet = np.linalg.slogdet(cov)
    assert sign > 0
    return -0.5 * (n * np.log(2 * np.pi) + logdet + t @ np.linalg.solve(cov, t))


def leep_ref(p, y):
    n = len(y)
    joint = np.zeros((y.max() + 1, p.shape[1]))
    for i in range(n):
        joint[y[i]] += p[i] / n
    cond = joint / joint.sum(axis=0)
    return np.mean([np.log(np.sum(cond[y[i]] * p[i])) for i in range(n)])


def nce_ref(p, y):
    z = p.argmax(axis=1)
    # -H(Y|Z) = I(Y;Z) - H(Y), both empirical, in nats.
    return mutual_info_score(y, z) - stats.entropy(np.bincount(y))


def nce_ref_counts(p, y):
    z = p.argmax(axis=1)
    n = len(y)
    pairs, zs = Counter(zip(y, z, strict=True)), Counter(z)
    return sum(k / n * math.log(k / zs[zz]) for (_, zz), k in pairs.items())


# ----------------------------------------------------------------------------------------------
# Each metric against its reference


@pytest.mark.parametrize("name,ref,rtol", [
    ("hscore", hscore_ref, 1e-8),
    ("shrinkage_hscore", shrinkage_hscore_ref, 1e-8),
    ("transrate", transrate_ref, 1e-9),
    ("gbc", gbc_ref, 1e-9),
    ("knn", knn_ref, 1e-14),  # the same neighbours: equal counts, means equal to the last bit
])
def test_metric_matches_reference(case, name, ref, rtol):
    f, y = case
    got = metrics.METRICS[name].fn(f, y)
    assert got.shape == f.shape[:-2] and got.dtype == np.float64
    want = np.array([ref(m, y) for _, m in _each(f)]).reshape(f.shape[:-2])
    # rtol: both sides are float64; the gap is rounding in different factorisations.
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-12)


def test_hscore_is_c_minus_1_when_n_below_d():
    # n - 1 <= d, features in general position: cov f spans every centred direction, so the
    # H-score is tr of the projector onto centred class indicators, C - 1, whatever the features.
    for lead, n, d, c in (CASES["n<d,C=2"], CASES["n<d,C=5"]):
        rng = np.random.default_rng(n)
        y = _labels(rng, n, c)
        np.testing.assert_allclose(metrics.hscore(_features(rng, lead, n, d, y), y), c - 1,
                                   rtol=1e-9)  # rounding only


@pytest.mark.parametrize("n,d", [(60, 12), (24, 40)])
def test_ledoit_wolf_matches_sklearn(n, d):
    rng = np.random.default_rng(d)
    x = np.abs(rng.normal(size=(2, n, d)) * np.linspace(2.0, 0.1, d) + 1.0)
    cov, alpha = metrics.ledoit_wolf(x)
    for i in range(2):
        sk_cov, sk_alpha = sk_ledoit_wolf(x[i])
        assert 0.0 < alpha[i] < 1.0
        np.testing.assert_allclose(alpha[i], sk_alpha, rtol=1e-10)  # same formula, float64
        np.testing.assert_allclose(cov[i], sk_cov, rtol=1e-10, atol=1e-14)


def test_logme_evidence_is_the_exact_marginal_likelihood(case):
    f, y = case
    fit = metrics.logme_fit(f, y)
    c = y.max() + 1
    assert fit.evidence.shape == (*f.shape[:-2], c)
    assert np.all(fit.iterations < metrics.LOGME_MAX_ITER)
    for idx, m in _each(f):
        for k in range(c):
            t = (y == k).astype(np.float64)
            want = exact_log_evidence(m, t, fit.alpha[idx][k], fit.beta[idx][k])
            # ~40 nats; the SVD route and the dense n x n route differ by rounding only. Without
            # the (d - k) log(alpha) / 2 term the n < d cases would be off by whole nats.
            np.testing.assert_allclose(fit.evidence[idx][k], want, rtol=1e-9)


def test_logme_fixed_point_maximises_the_evidence(case):
    f, y = case
    fit = metrics.logme_fit(f, y)
    h = 1e-4  # step in log(alpha), log(beta)
    interior = 0
    for idx, m in _each(f):
        for k in range(y.max() + 1):
            t = (y == k).astype(np.float64)
            a, b = fit.alpha[idx][k], fit.beta[idx][k]
            best = exact_log_evidence(m, t, a, b)
            for da, db in ((h, 0), (-h, 0), (0, h), (0, -h), (h, h), (-h, -h), (h, -h)):
                # No neighbour is better, up to rounding of the ~40-nat value.
                assert exact_log_evidence(m, t, a * np.exp(da), b * np.exp(db)) <= best + 1e-10
            grad = [(exact_log_evidence(m, t, a * np.exp(h), b)
                     - exact_log_evidence(m, t, a * np.exp(-h), b)) / (2 * h),
                    (exact_log_evidence(m, t, a, b * np.exp(h))
                     - exact_log_evidence(m, t, a, b * np.exp(-h))) / (2 * h)]
            # Stationary: central differences (truncation ~h^2, rounding ~1e-16 * 40 / h).
            np.testing.assert_allclose(grad, 0.0, atol=1e-6)
            interior += b < 1e8  # not the noise-free limit
    assert interior > 0  # at least one (alpha, beta) is a genuine interior maximum here


def test_logme_boundary_limits_stay_exact():
    # The supremum can be a limit: beta -> infinity when n < d and the features interpolate the
    # labels (case "interpolating"), alpha -> infinity when a class indicator is unexplained by
    # the features (class 0 of case "unexplained": no constant direction). The loop stops there,
    # and the value is still the exact evidence of the (alpha, beta) it returns.
    rng = np.random.default_rng(3)
    n, d = 24, 40
    y2 = _labels(rng, n, 2)
    unexplained = rng.normal(size=(n, d)) * np.linspace(1.0, 0.05, d) + 3.0 * y2[:, None]
    y3 = _labels(rng, n, 3)
    interpolating = 0.05 * rng.normal(size=(n, d))
    interpolating[:, :3] += 3.0 * np.eye(3)[y3]
    limits = []
    for f, y in ((unexplained, y2), (interpolating, y3)):
        fit = metrics.logme_fit(f, y)
        assert np.all(np.isfinite(fit.evidence))
        assert np.all(fit.iterations < metrics.LOGME_MAX_ITER)
        limits.append(fit.alpha.max() / fit.beta.min() > 1e20 or fit.beta.max() > 1e15)
        for k in range(y.max() + 1):
            want = exact_log_evidence(f, (y == k).astype(np.float64), fit.alpha[k], fit.beta[k])
            np.testing.assert_allclose(fit.evidence[k], want, rtol=1e-9)  # rounding only
    assert all(limits)  # both cases really went to a limit


def test_gbc_closed_form_is_the_bhattacharyya_integral():
    # d = 1, two classes: GBC = -2 BC, and BC = integral of sqrt(p q) for the fitted Gaussians.
    rng = np.random.default_rng(5)
    y = _labels(rng, 40, 2)
    f = rng.normal(size=(40, 1)) * np.where(y == 0, 1.0, 2.5)[:, None] + 1.2 * y[:, None]
    params = [(f[y == c, 0].mean(), f[y == c, 0].std()) for c in (0, 1)]
    bc, _ = integrate.quad(lambda x: np.sqrt(stats.norm.pdf(x, *params[0])
                                             * stats.norm.pdf(x, *params[1])), -40, 40,
                           epsabs=1e-13, epsrel=1e-12)
    np.testing.assert_allclose(metrics.gbc(f, y), -2 * bc, rtol=1e-9)  # quadrature accuracy


def test_knn_row_blocks_cover_every_sample(monkeypatch):
    # 37 rows in blocks of 8: the last block is padded. A shape no other test uses, so this
    # compiles afresh with the small block instead of reusing a cached program.
    monkeypatch.setattr(metrics, "KNN_ROW_BLOCK", 8)
    rng = np.random.default_rng(17)
    y = _labels(rng, 37, 3)
    f = _features(rng, (2,), 37, 5, y, shift=1.0)
    got = metrics.knn(f, y)
    # Same neighbours, so the same count; the mean of it may differ in the last bit.
    np.testing.assert_allclose(got, [knn_ref(f[0], y), knn_ref(f[1], y)], rtol=1e-14)


# ----------------------------------------------------------------------------------------------
# Against the published implementations (tests/reference_metrics.py names each source)


@pytest.mark.parametrize("name,published,rtol", [
    ("gbc", gbc_stable_transfer, 1e-11),
    ("hscore", h_score_tllib, 1e-11),
    ("shrinkage_hscore", regularized_h_score_tllib, 1e-11),
    ("transrate", transrate_tllib, 1e-11),
])
def test_metric_matches_the_published_code(case, name, published, rtol):
    # Unequal class sizes: TransRate's 1/C and the shrinkage H-score's n - 1 are the published
    # ones. rtol: float64 both sides, different factorisations (measured up to 3e-13).
    f, y = case
    got = metrics.METRICS[name].fn(f, y)
    want = np.array([published(m, y) for _, m in _each(f)]).reshape(f.shape[:-2])
    np.testing.assert_allclose(got, want, rtol=rtol)


@pytest.mark.parametrize("n,d,c", [(60, 12, 3), (30, 50, 5)])
def test_transrate_matches_the_published_code_on_balanced_classes(n, d, c):
    rng = np.random.default_rng(7)
    y = rng.permutation(np.arange(n) % c)
    f = _features(rng, (), n, d, y)
    np.testing.assert_allclose(metrics.transrate(f, y), transrate_tllib(f, y), rtol=1e-13)


def test_logme_matches_the_published_code_when_n_exceeds_d(case):
    f, y = case
    if f.shape[-2] <= f.shape[-1]:
        # n <= d: the published evidence omits (d - k) log(alpha) / 2 from log|A| (docs): here
        # it overstates the exact evidence (test_logme_evidence_is_the_exact_marginal_likelihood)
        # by whole nats per sample.
        gap = np.array([logme_thuml(m, y) for _, m in _each(f)]) - metrics.logme(f, y).ravel()
        assert np.all(gap > 0.5)
        return
    want = np.array([logme_thuml(m, y) for _, m in _each(f)]).reshape(f.shape[:-2])
    # The published loop stops at a 1e-3 change of alpha/beta and evaluates the evidence with
    # the previous iterate's m; ours converges to 1e-10 (measured gap up to 1e-7).
    np.testing.assert_allclose(metrics.logme(f, y), want, rtol=2e-5)


# ----------------------------------------------------------------------------------------------
# LEEP and NCE (source-head metrics)


def _probs(rng, lead, n, z, temperature=1.5):
    logits = rng.normal(size=(*lead, n, z)) * temperature
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("c", [2, 4])
def test_leep_and_nce_match_reference(c):
    rng = np.random.default_rng(c)
    y = _labels(rng, 50, c)
    p = _probs(rng, (3,), 50, 7)
    got_leep, got_nce = metrics.leep(p, y), metrics.nce(p, y)
    assert got_leep.shape == (3,) and got_nce.shape == (3,)
    for i in range(3):
        np.testing.assert_allclose(got_leep[i], leep_ref(p[i], y), rtol=1e-12)  # float64 sums
        # The published code (tllib); NCE's 1e-20 inside its log changes ~1e-20 nats.
        np.testing.assert_allclose(got_leep[i], leep_tllib(p[i], y), rtol=1e-12)
        np.testing.assert_allclose(got_nce[i], nce_tllib(p[i].argmax(axis=1), y), rtol=1e-10,
                                   atol=1e-12)
        np.testing.assert_allclose(got_nce[i], nce_ref(p[i], y), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got_nce[i], nce_ref_counts(p[i], y), rtol=1e-12, atol=1e-14)


def test_head_metrics_ignore_unused_source_classes_and_their_order():
    rng = np.random.default_rng(11)
    y = _labels(rng, 50, 4)
    p = _probs(rng, (), 50, 7)
    perm = rng.permutation(7)
    padded = np.concatenate([p[:, perm], np.zeros((50, 3))], axis=1)
    for name in ("leep", "nce"):
        fn = metrics.METRICS[name].fn
        np.testing.assert_allclose(fn(padded, y), fn(p, y), rtol=1e-12)  # reordered sums only


# ----------------------------------------------------------------------------------------------
# Invariances (hypothesis): one shape, so one compilation per metric


_INV = np.random.default_rng(2024)
_INV_Y = _labels(_INV, 60, 3)
_INV_F = _features(_INV, (), 60, 12, _INV_Y)


def _all_scores(f, y):
    return np.array([metrics.METRICS[name].fn(f, y) for name in FEATURE_METRICS])


_INV_BASE = None


def _base():
    global _INV_BASE
    if _INV_BASE is None:
        _INV_BASE = _all_scores(_INV_F, _INV_Y)
    return _INV_BASE


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_sample_permutation_and_label_renaming_change_nothing(seed):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(60)
    rename = rng.permutation(3) * 7 - 5  # any distinct integers
    got = _all_scores(_INV_F[perm], rename[_INV_Y[perm]])
    # Sums in another order: rounding only. knn compares exactly (no near-ties in random data).
    np.testing.assert_allclose(got, _base(), rtol=1e-9, atol=1e-12)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_orthogonal_rotation_changes_nothing(seed):
    # Every feature metric here is rotation invariant (LogME's prior and GBC's variances are
    # isotropic, TransRate's log-determinants and H-scores' traces are similarity invariant).
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(12, 12)))
    np.testing.assert_allclose(_all_scores(_INV_F @ q, _INV_Y), _base(), rtol=1e-8, atol=1e-12)


@settings(max_examples=6, deadline=None)
@given(scale=st.floats(0.01, 100.0), shift_seed=st.integers(0, 2**32 - 1))
def test_scale_and_translation(scale, shift_seed):
    shift = np.random.default_rng(shift_seed).normal(size=12) * 10
    base = dict(zip(FEATURE_METRICS, _base(), strict=True))
    moved = dict(zip(FEATURE_METRICS, _all_scores(_INV_F * scale + shift, _INV_Y), strict=True))
    # Scale and translation invariant: both H-scores, 1-NN.
    for name in ("hscore", "shrinkage_hscore", "knn"):
        np.testing.assert_allclose(moved[name], base[name], rtol=1e-8, atol=1e-12)
    # GBC: translation invariant; its variance floor (1e-4, the authors') fixes a scale.
    np.testing.assert_allclose(metrics.gbc(_INV_F + shift, _INV_Y), base["gbc"], rtol=1e-9)
    # TransRate centres the features (translation invariant) but its eps fixes a scale.
    translated = metrics.transrate(_INV_F + shift, _INV_Y)
    np.testing.assert_allclose(translated, base["transrate"], rtol=1e-9)


# ----------------------------------------------------------------------------------------------
# Registry, model-level scoring, precision


def test_registry_is_uniform():
    assert set(metrics.METRICS) == {"ddscore", "hscore", "shrinkage_hscore", "logme",
                                    "transrate", "gbc", "knn", "leep", "nce"}
    assert {n for n, m in metrics.METRICS.items() if m.needs_head} == {"leep", "nce"}
    for name, m in metrics.METRICS.items():
        assert m.name == name
        if not m.needs_head:  # a single (n, d) matrix gives a 0-d array
            out = m.fn(_INV_F, _INV_Y)
            assert out.shape == () and out.dtype == np.float64 and np.isfinite(out)
    # LogME's score is the mean over classes of the evidence, divided by n.
    fit = metrics.logme_fit(_INV_F, _INV_Y)
    np.testing.assert_allclose(metrics.logme(_INV_F, _INV_Y), fit.evidence.mean() / 60,
                               rtol=1e-12)  # the same numbers, one division


def test_score_models_feature_and_head_metrics():
    rng = np.random.default_rng(13)
    n = 50
    y = _labels(rng, n, 3)
    feats = {name: {b: _features(rng, (), n, 12, y) for b in ("layer3.0", "layer3.1")}
             for name in ("a", "b", "c")}
    ranked = metrics.score_models(feats, y, metric="gbc", train_fraction=0.8, seed=1)
    idx = metrics.train_indices(n, 0.8, 1)
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    for r in ranked:
        for b, v in r.block_scores.items():
            np.testing.assert_allclose(v, metrics.gbc(feats[r.name][b][idx], y[idx]), rtol=1e-12)
        np.testing.assert_allclose(r.score, np.mean(list(r.block_scores.values())), rtol=1e-12)
    # Head metrics: source heads of different widths are zero-padded to one stack.
    probs = {"a": _probs(rng, (), n, 5), "b": _probs(rng, (), n, 9)}
    ranked = metrics.score_models(probs, y, metric="leep", train_fraction=0.8, seed=1)
    for r in ranked:
        assert r.block_scores == {}
        np.testing.assert_allclose(r.score, leep_ref(probs[r.name][idx], y[idx]), rtol=1e-12)
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.score_models(feats, y, metric="nope")


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="at least 2 classes"):
        metrics.hscore(_INV_F, np.zeros(60, dtype=int))
    with pytest.raises(ValueError, match="do not match"):
        metrics.gbc(_INV_F, _INV_Y[:-1])
    with pytest.raises(ValueError, match="sum to 1"):
        metrics.leep(np.ones((60, 4)), _INV_Y)


def test_float32_path_agrees_roughly():
    # The TPU path (no float64): single precision, well-conditioned data, loose tolerance.
    for name in ("hscore", "gbc"):
        fn = metrics.METRICS[name].fn
        np.testing.assert_allclose(fn(_INV_F, _INV_Y, precision="float32"),
                                   fn(_INV_F, _INV_Y), rtol=1e-3)
