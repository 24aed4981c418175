"""The package's seams: what a reader (and ``import``) finds under each name."""

import importlib
import pkgutil
import types

import ddscore_jax


def test_no_module_is_shadowed_by_a_name_in_the_package():
    """``ddscore_jax.<name>`` is the module ``<name>.py`` for every module of the package, so the
    public functions (``rank``, ``extract``, ``score``) never hide a module of the same name."""
    names = [m.name for m in pkgutil.iter_modules(ddscore_jax.__path__)]
    assert {"api", "forward", "ddscore"} <= set(names)
    for name in names:
        module = importlib.import_module(f"ddscore_jax.{name}")
        bound = getattr(ddscore_jax, name)
        assert bound is module, f"ddscore_jax.{name} is {bound!r}, not the module {module.__name__}"
    for public in ddscore_jax.__all__[1:]:
        assert not isinstance(getattr(ddscore_jax, public), types.ModuleType), public
