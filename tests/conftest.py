import os
import tempfile

import jax

# Parity tests compare float32 forwards: no reduced-precision matmuls (TF32 on GPUs otherwise).
jax.config.update("jax_default_matmul_precision", "highest")

# One private cache root for the whole run (inherited by CLI subprocesses): tests never read a
# user's ~/.cache, and nothing a test caches outlives the run.
os.environ["DDSCORE_JAX_CACHE"] = tempfile.mkdtemp(prefix="ddscore-jax-test-cache-")
