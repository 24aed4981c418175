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


def test_every_module_the_package_imports_is_a_declared_dependency():
    """What ``pip install ddscore-jax[extras]`` installs covers every import of the package,
    lazy ones inside functions included (scipy was once imported at run time but declared only
    for the tests). The ``test`` extra does not count."""
    import ast
    import re
    import sys
    import tomllib
    from importlib.metadata import packages_distributions
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = {k: v for k, v in project["optional-dependencies"].items() if k != "test"}
    declared = {re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")
                for req in project["dependencies"] + sum(extras.values(), [])}
    imported = set()
    for folder in ("ddscore_jax", "converters", "cli"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"ddscore_jax", "__future__"}
    assert "scipy" in third_party  # the check sees lazy imports
    distributions = packages_distributions()
    for name in sorted(third_party):
        dists = {d.lower().replace("_", "-") for d in distributions.get(name, [name])}
        assert dists & declared, f"{name} (from {sorted(dists)}) is not a declared dependency"


def test_the_package_imports_run_one_way():
    """No import cycle among the package's modules, lazy imports inside functions included
    (ddscore -> settings -> metrics -> ddscore was one), and every module imports on its own in a
    fresh interpreter."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "ddscore_jax"
    modules = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in modules:
        deps = set()
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("ddscore_jax."):
                    deps.add(node.module.split(".")[1])
                elif node.module == "ddscore_jax":
                    deps |= {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names
                         if a.name.startswith("ddscore_jax.")}
        graph[name] = deps & modules
    # Depth-first search for a back edge.
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path + [node, dep])}"
            if dep not in state:
                visit(dep, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert "settings" in graph["ddscore"] and "ddscore" not in graph["settings"]
    for m in ("settings", "ddscore", "metrics", "resample"):
        subprocess.run([sys.executable, "-c", f"import ddscore_jax.{m}"], check=True)
