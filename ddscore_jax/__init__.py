"""ddscore-jax: rank pre-trained ResNets for a small labelled image set with D-deepscore.

Public API: :func:`rank`, :func:`extract`, :func:`score`. Everything else is an implementation
module that a reader finds by its name (``model``, ``data``, ``forward``, ``ddscore``, ``zoo``,
...); no module shares a name with these three functions, so a module is never hidden by one.
"""

__version__ = "0.1.0"

from ddscore_jax.api import extract, rank, score  # noqa: E402

__all__ = ["__version__", "extract", "rank", "score"]
