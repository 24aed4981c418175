"""The ``ddscore-jax`` command line (installed as ``ddscore_jax.cli``)."""
