"""How the metrics call LAPACK on CPU without deadlocking: one matrix per call, one BLAS thread.

jaxlib 0.10's CPU LAPACK kernels (``lapack_dgesdd_ffi``, ``_dpotrf_``, ``_dgeqrf_``...) hand the
matrices of a batched call to XLA's intra-op thread pool and block on a counter until they are done
(``jax::ParallelBatchMap``); each matrix then goes to scipy's bundled OpenBLAS, which is itself
multi-threaded. Stacks of hung ``rank --metric logme`` processes show the two ways this wedges:

1. Two batched decompositions run side by side (XLA runs independent thunks concurrently). Each
   occupies a pool thread and waits for tasks queued behind the other: on 2 cores the pool has no
   thread left to run them (all pool threads in ``BlockingCounter::Wait``, 0% CPU).
2. Two pool threads call OpenBLAS at once. Its thread server has one helper thread on 2 cores and
   both callers wait on it (``exec_blas_async_wait``) for ever; other runs instead corrupted the
   heap and spun in the garbage collector at exit.

So the mechanism has two halves, and every metric goes through both:

- :func:`map_matrices` applies a per-matrix function with ``lax.map`` instead of ``vmap``: each
  LAPACK call then sees one matrix, and ``ParallelBatchMap`` runs a one-matrix batch inline on the
  calling thread, never waiting on the pool (the batch is parallel across XLA's threads instead).
- :func:`single_threaded_blas` sets scipy's OpenBLAS to one thread, so concurrent LAPACK calls run
  each on its own caller's thread and share nothing. XLA's own convolutions and matmuls do not use
  OpenBLAS, so the forward is unaffected.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import jax

# OpenBLAS builds name the setter with their symbol prefix (scipy's: ``scipy_openblas_``).
_SETTERS = ("scipy_openblas_set_num_threads", "openblas_set_num_threads")


@functools.cache
def single_threaded_blas() -> str | None:
    """Set the OpenBLAS behind jaxlib's LAPACK kernels to one thread, once per process.

    Returns the library's path, or None where LAPACK is not an OpenBLAS (an MKL or Accelerate
    scipy: those take concurrent callers, and :func:`map_matrices` alone removes the pool wait).
    """
    # jaxlib's kernels call LAPACK through scipy's Cython table: load it (jaxlib does the same).
    import scipy.linalg.cython_lapack  # noqa: F401

    for path in _loaded_libraries():
        if "openblas" not in path.lower():
            continue
        lib = ctypes.CDLL(path)  # already mapped: dlopen returns the same handle
        # The one with 32-bit LAPACK symbols is scipy's, the one jaxlib calls; numpy's own
        # OpenBLAS (64-bit integers, ``..._64_`` names) is left as it is.
        if not any(hasattr(lib, f) for f in ("scipy_dgesdd_", "dgesdd_")):
            continue
        for name in _SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter.argtypes = [ctypes.c_int]
                setter(1)
                return path
    return None


def _loaded_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if ".so" in line})
    except OSError:  # not Linux: look where scipy's wheels put their OpenBLAS
        import glob
        import os

        import scipy

        libs = os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs")
        return sorted(glob.glob(os.path.join(libs, "*openblas*")))


def map_matrices(fn: Callable, stacked: jax.Array, *args) -> jax.Array:
    """``fn(stacked[i], *args)`` for each i, stacked on axis 0 (pytrees too), inside a jit.

    ``lax.map``, not ``vmap``: see the module docstring. Call :func:`single_threaded_blas` before
    the first execution (the metric entry points do).
    """
    return jax.lax.map(lambda x: fn(x, *args), stacked)
