"""The published D-deepscore, transcribed step by step in NumPy: the yardstick for ``ddscore.py``.

Not used to rank (``ddscore_jax.ddscore`` computes the same number in closed form, jitted); the
tests and benchmarks compare against it.
"""

from __future__ import annotations

import numpy as np


def published_score(f: np.ndarray, y: np.ndarray) -> float:
    """The four steps of docs/method.md as the reference writes them, in the dtype of ``f``:
    class-mean matrix, rotation into each matrix's own right-singular basis (NumPy's default full
    SVD), uncentred covariances, ``trace(pinv(F, rcond=1e-10) @ G)``."""
    n = f.shape[0]
    g = np.empty_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(axis=0)
    _, _, vt_f = np.linalg.svd(f)
    _, _, vt_g = np.linalg.svd(g)
    f_rot, g_rot = f @ vt_f.T, g @ vt_g.T
    cov_f = f_rot.T @ f_rot / (n - 1)
    cov_g = g_rot.T @ g_rot / (n - 1)
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-10) @ cov_g))
