"""pyproject's version ranges and constraints.txt (the exactly tested set) agree, and the README's
test command and .ci/run install that set."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
UNTESTED_EXTRAS = {"gpu"}  # needs a GPU machine: not in the tested set


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def test_every_tested_version_is_inside_the_declared_range():
    project, pins = _project(), _constraints()
    declared = [("dependencies", r) for r in project["dependencies"]]
    declared += [(f"[{extra}]", r) for extra, reqs in project["optional-dependencies"].items()
                 if extra not in UNTESTED_EXTRAS for r in reqs]
    assert len(declared) > 20
    for where, line in declared:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} ({where}) has no version in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{req.name}=={pins[name]} (constraints.txt) is outside {line!r} ({where})"


def test_the_gpu_extra_follows_the_jax_range():
    project = _project()
    jax = next(Requirement(r) for r in project["dependencies"] if r.startswith("jax>"))
    jaxlib = next(Requirement(r) for r in project["dependencies"] if r.startswith("jaxlib"))
    gpu = next(Requirement(r) for r in project["optional-dependencies"]["gpu"]
               if r.startswith("jax["))
    assert gpu.specifier == jax.specifier == jaxlib.specifier


def test_no_exact_pins_in_the_declared_ranges():
    project = _project()
    for line in project["dependencies"]:
        assert "==" not in line, line


def test_readme_and_ci_install_the_tested_set():
    command = 'pip install -e ".[test]" -c constraints.txt && python -m pytest'
    readme = (ROOT / "README.md").read_text()
    assert command in readme.split("\n\n", 2)[1]  # the second command of the opening block
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == command
