"""Every third-party package the code imports is declared in pyproject.toml, and every module imports.

A fresh `pip install -e .` installs only what pyproject.toml declares; a module that imports an
undeclared package (matplotlib, scipy) fails there with ModuleNotFoundError. The import graph
is read from the source, so the check holds whatever this environment happens to have.
"""

import ast
import importlib
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
OPTIONAL = {"timm": "timm", "pytorch_grad_cam": "bench"}  # imported only inside the function that needs
# it, declared as an extra


def modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py") if p.name != "__main__.py")


def imported_top_levels(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(extra: str | None = None) -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {normalise(re.split(r"[<>=!~ \[;]", spec, maxsplit=1)[0]) for spec in specs}


def test_every_imported_package_is_declared():
    third_party = set().union(*map(imported_top_levels, modules())) - set(sys.stdlib_module_names) - set(PACKAGES)
    distributions = importlib.metadata.packages_distributions()
    required, optional = declared(), {normalise(d) for extra in set(OPTIONAL.values()) for d in declared(extra)}
    undeclared = []
    for module in sorted(third_party):
        names = {normalise(d) for d in distributions.get(module, [module])}
        if not names & (optional if module in OPTIONAL else required):
            undeclared.append(f"{module} ({', '.join(sorted(names))})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {', '.join(undeclared)}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_module_imports(path):
    parts = path.relative_to(REPO).with_suffix("").parts
    importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
