"""D-deepscore against an independent NumPy implementation of the published four steps."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddscore_jax import reference
from ddscore_jax.ddscore import block_scores, score_models, train_indices

# float64 on both sides; the closed form and the four steps agree to ~1e-15 (docs/method.md).
SCORE_RTOL = 1e-9


def published_score(f: np.ndarray, y: np.ndarray) -> float:
    """The reference's four steps (``ddscore_jax.reference``), in float64."""
    return reference.published_score(np.asarray(f, np.float64), y)


def relu_features(rng, n, d, classes, spread=1.0):
    """Uncentred ReLU-like features with a dominant mean direction, as conv4_x features are."""
    y = rng.permutation(np.arange(n) % classes)
    centres = rng.normal(size=(classes, d)) * spread
    f = np.maximum(rng.normal(size=(n, d)) + centres[y] + 2.0 * rng.normal(size=d), 0.0)
    return f, y


@pytest.mark.parametrize("n,d,classes", [(120, 256, 2), (300, 256, 6), (40, 256, 3), (25, 8, 4)])
def test_matches_published_four_steps(n, d, classes):
    f, y = relu_features(np.random.default_rng(n * d + classes), n, d, classes)
    ours = block_scores(f, y, precision="float64")
    ref = published_score(f, y)
    assert abs(ours - ref) <= SCORE_RTOL * abs(ref)
    assert 0.0 <= ours <= classes


def test_vectorised_over_models_and_blocks_equals_one_at_a_time():
    rng = np.random.default_rng(3)
    y = np.arange(60) % 3
    stack = np.stack([np.stack([relu_features(rng, 60, 32, 3)[0] for _ in range(2)])
                      for _ in range(3)])  # (models, blocks, n, d)
    scores = block_scores(stack, y)
    assert scores.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            assert abs(scores[i, j] - published_score(stack[i, j], y)) <= SCORE_RTOL * scores[i, j]


def test_score_models_uses_the_seeded_split_and_ranks():
    rng = np.random.default_rng(5)
    f_good, y = relu_features(rng, 100, 16, 2, spread=3.0)
    f_bad, _ = relu_features(rng, 100, 16, 2, spread=0.0)
    feats = {"bad": {"layer3.0": f_bad, "layer3.1": f_bad},
             "good": {"layer3.0": f_good, "layer3.1": f_good * 2}}
    ranked = score_models(feats, y, train_fraction=0.8, seed=11)
    assert [m.name for m in ranked] == ["good", "bad"]
    idx = train_indices(100, 0.8, 11)
    assert len(idx) == 80 and len(set(idx.tolist())) == 80
    expected = published_score(f_good[idx], y[idx])
    assert abs(ranked[0].block_scores["layer3.0"] - expected) <= SCORE_RTOL * expected
    assert abs(ranked[0].score - np.mean(list(ranked[0].block_scores.values()))) < 1e-15
    again = score_models(feats, y, train_fraction=0.8, seed=11)
    assert [m.score for m in again] == [m.score for m in ranked]
    other_seed = score_models(feats, y, train_fraction=0.8, seed=12)
    assert other_seed[0].score != ranked[0].score


def test_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        block_scores(np.ones((5, 3)), np.zeros(5, int))


def test_float32_path_accuracy():
    # The TPU path (no float64 there): SVD-based in float32, documented as ~1e-4 relative.
    f, y = relu_features(np.random.default_rng(9), 200, 256, 4)
    f32 = block_scores(f.astype(np.float32), y, precision="float32")
    f64 = block_scores(f.astype(np.float32), y, precision="float64")
    assert abs(f32 - f64) <= 1e-4 * f64


@st.composite
def problems(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(6, 50))
    d = draw(st.integers(2, 40))
    classes = draw(st.integers(2, min(5, n)))
    f, y = relu_features(np.random.default_rng(seed), n, d, classes)
    return f, y, seed


@settings(max_examples=25, deadline=None)
@given(problems(), st.floats(0.01, 100.0))
def test_invariances(problem, scale):
    f, y, seed = problem
    rng = np.random.default_rng(seed + 1)
    base = block_scores(f, y)
    perm = rng.permutation(len(y))
    renamed = np.array([10, 3, 7, 1, 5])[y]  # another order, other integers
    q, _ = np.linalg.qr(rng.normal(size=(f.shape[1], f.shape[1])))
    variants = {
        "permuted samples": block_scores(f[perm], y[perm]),
        "renamed labels": block_scores(f, renamed),
        "scaled features": block_scores(f * scale, y),
        "rotated features": block_scores(f @ q, y),
    }
    for name, value in variants.items():
        assert abs(value - base) <= 1e-8 * max(1.0, base), name
    assert -1e-12 <= base <= len(np.unique(y)) + 1e-9
