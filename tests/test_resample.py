"""The stratified bootstrap (ddscore_jax.resample): each metric's weighted form against the metric
computed on explicitly resampled rows, the draws, and the summary statistics."""

import numpy as np
import pytest

from ddscore_jax import metrics, resample
from ddscore_jax.ddscore import block_scores


def _features(n: int, d: int, classes: int, seed: int, zero_columns: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centres = rng.normal(size=(classes, d))
    # ReLU-like: non-negative, a large common mean (the uncentred Gram's top direction), and
    # optionally dead channels (exact zero columns, a rank-deficient Gram).
    f = np.abs(centres[y] + rng.normal(size=(n, d))) + 1.0
    if zero_columns:
        f[:, :zero_columns] = 0.0
    return f, y


def _explicit_knn(f: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    # The replicate's leave-one-image-out 1-NN, written on gathered rows: a row's copies (same
    # source image) are never its neighbour; ties go to the lowest source index.
    src = np.repeat(np.arange(len(y)), w)
    g, gy = f[src], y[src]
    d2 = ((g[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    d2[src[:, None] == src[None, :]] = np.inf
    nn = np.argmin(d2, axis=1)
    return float(np.mean(gy[nn] == gy))


FEATURE_METRICS = ["ddscore", "hscore", "shrinkage_hscore", "logme", "transrate", "gbc", "knn"]


@pytest.mark.parametrize("n,d,zero", [(48, 6, 0), (48, 8, 2), (18, 30, 0)],
                         ids=["n>d", "dead-channels", "n<d"])
def test_weighted_forms_equal_the_metric_on_resampled_rows(n, d, zero):
    f, y = _features(n, d, 3, seed=n + d, zero_columns=zero)
    counts = resample.bootstrap_counts(y, 6, seed=3)
    got = resample.replicate_scores(FEATURE_METRICS, f[None], y, counts, precision="float64")
    for metric in FEATURE_METRICS:
        for r, w in enumerate(counts):
            if metric == "logme" and (w > 0).sum() <= d:
                # Duplicated rows fitted exactly: the evidence is unbounded, no score.
                assert np.isnan(got[metric][0, r])
                continue
            rows = np.repeat(np.arange(n), w)
            if metric == "knn":
                want = _explicit_knn(f, y, w)
            elif metric == "ddscore":
                want = float(block_scores(f[rows], y[rows], precision="float64"))
            else:
                want = float(getattr(metrics, metric)(f[rows], y[rows], precision="float64"))
            assert got[metric][0, r] == pytest.approx(want, rel=1e-9, abs=1e-12), (metric, r)


def test_weighted_head_metrics_equal_the_metric_on_resampled_rows():
    rng = np.random.default_rng(5)
    n, z = 40, 7
    y = np.arange(n) % 4
    logits = rng.normal(size=(n, z)) + 2.0 * np.eye(z)[y % z]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    counts = resample.bootstrap_counts(y, 5, seed=1)
    got = resample.replicate_scores(["leep", "nce"], p[None], y, counts, precision="float64")
    for r, w in enumerate(counts):
        rows = np.repeat(np.arange(n), w)
        for metric in ("leep", "nce"):
            want = float(getattr(metrics, metric)(p[rows], y[rows], precision="float64"))
            assert got[metric][0, r] == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_logme_on_a_duplicated_sample_is_not_the_naive_knn_pitfall():
    # The pitfall the weighted 1-NN avoids: on gathered rows, a copy of an image is its own
    # nearest neighbour at distance 0, so a plain leave-one-out on the replicate is near 1 even
    # for features that carry nothing about the labels.
    rng = np.random.default_rng(0)
    f, y = rng.normal(size=(60, 5)), np.arange(60) % 2
    counts = resample.bootstrap_counts(y, 20, seed=0)
    got = resample.replicate_scores(["knn"], f[None], y, counts, precision="float64")["knn"][0]
    naive = [float(metrics.knn(f[np.repeat(np.arange(60), w)], y[np.repeat(np.arange(60), w)],
                               precision="float64")) for w in counts]
    assert np.mean(naive) > 0.6 > np.mean(got) > 0.3


def test_bootstrap_counts_are_stratified_and_seeded():
    y = np.array([0] * 7 + [1] * 3 + [2] * 11)
    a = resample.bootstrap_counts(y, 200, seed=4)
    assert a.shape == (200, 21)
    for c in (0, 1, 2):
        assert (a[:, y == c].sum(axis=1) == (y == c).sum()).all()
    assert np.array_equal(a, resample.bootstrap_counts(y, 200, seed=4))
    assert not np.array_equal(a, resample.bootstrap_counts(y, 200, seed=5))
    # With replacement: about 1 - 1/e of the images are drawn at least once.
    assert 0.55 < (a > 0).mean() < 0.72


def test_summarise_ties_ranks_and_leader():
    rng = np.random.default_rng(2)
    base = rng.normal(size=500)
    reps = {"a": base + 5.0, "a_copy": base + 5.0, "c": base + rng.normal(size=500) * 0.1}
    points = {"a": 5.0, "a_copy": 5.0, "c": 0.0}
    u = resample.summarise(reps, points)
    assert u["a"].p_best == u["a_copy"].p_best == 0.5
    assert u["a"].rank_interval == (1, 1) == u["a_copy"].rank_interval
    assert u["a"].tied_with_best and u["a_copy"].tied_with_best and not u["c"].tied_with_best
    assert u["c"].rank_interval == (3, 3) and u["c"].p_best == 0.0
    # The interval is the replicates' spread, centred on the point score by their median.
    lo, hi = u["c"].interval
    centred = reps["c"] - np.median(reps["c"])
    assert np.quantile(centred, 0.025) == pytest.approx(lo)
    assert np.quantile(centred, 0.975) == pytest.approx(hi)


def test_summarise_removes_each_models_own_offset():
    # Replicates offset from the point score by a different amount per model (as a metric
    # biased on repeated images gives): ranks and P(best) follow the points, not the offsets.
    rng = np.random.default_rng(4)
    noise = rng.normal(size=(2, 400)) * 0.002
    reps = {"a": 1.0 + 0.05 + noise[0], "b": 0.98 + 0.30 + noise[1]}
    u = resample.summarise(reps, {"a": 1.0, "b": 0.98})
    assert u["a"].p_best == 1.0 and u["b"].p_best == 0.0
    assert u["a"].rank_interval == (1, 1) and not u["b"].tied_with_best
    for name, point in (("a", 1.0), ("b", 0.98)):
        assert u[name].interval[0] < point < u[name].interval[1]
