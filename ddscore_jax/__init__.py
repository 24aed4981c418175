"""ddscore-jax: rank pre-trained ResNets for a small labelled image set with D-deepscore.

Public API: :func:`rank`, :func:`extract`, :func:`score`, :func:`convert`, :func:`finetune`,
:func:`evaluate` (from :mod:`ddscore_jax.api`). Everything else is an implementation module that a
reader finds by its name (``model``, ``data``, ``forward``, ``ddscore``, ``resample``, ``zoo``,
``conversion``, ``finetuning``, ``evaluation``, ...); no module shares a name with these
functions, so a module is never hidden by one.

The functions load on first use (a module ``__getattr__``): ``import ddscore_jax`` imports no JAX,
so the command line's ``--help``, ``--version`` and argument errors answer at once.
"""

__version__ = "0.1.0"

# The public functions, all in ddscore_jax.api.
_API = ("convert", "evaluate", "extract", "finetune", "rank", "score")

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from ddscore_jax import api

        value = getattr(api, name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'ddscore_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
