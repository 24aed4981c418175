"""ddscore-jax: rank pre-trained ResNets for a small labelled image set with D-deepscore.

Public API (ddscore_jax.api): :func:`rank`, :func:`extract`, :func:`score`, :func:`convert`,
:func:`finetune`, :func:`evaluate`. Everything else is an implementation module that a reader
finds by its name (``model``, ``data``, ``forward``, ``ddscore``, ``resample``, ``zoo``, ...); no
module shares a name with these functions, so a module is never hidden by one.
"""

__version__ = "0.1.0"

from ddscore_jax.api import convert, evaluate, extract, finetune, rank, score  # noqa: E402

__all__ = ["__version__", "convert", "evaluate", "extract", "finetune", "rank", "score"]
