"""pyproject.toml declares what the code imports, and imports what it declares."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "core", "distill", "students", "eval", "offline", "recipes")
# Declared, used, never imported by name: accelerate starts its tensorboard tracker itself.
USED_WITHOUT_IMPORT = {"tensorboard"}


def _requirement_name(text: str) -> str:
    return re.split(r"[<>=!~\[; ]", text, maxsplit=1)[0].lower().replace("_", "-")


def _imported_top_level_names(folders) -> set[str]:
    names = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - set(PACKAGES) - {"__future__"}


def _distributions(names: set[str]) -> dict[str, set[str]]:
    """Import name -> the distributions that provide it (lower case, '-' for '_')."""
    mapping = packages_distributions()
    return {
        name: {d.lower().replace("_", "-") for d in mapping.get(name, [name])} for name in names
    }


def test_every_import_is_declared_and_every_declaration_is_used() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = {
        _requirement_name(r) for group in project["optional-dependencies"].values() for r in group
    }
    provided = _distributions(_imported_top_level_names(PACKAGES))
    undeclared = {name for name, dists in provided.items() if not dists & (core | extras)}
    assert not undeclared, f"imported by the package but not declared: {sorted(undeclared)}"
    imported = set().union(*provided.values())
    unused = core - imported - USED_WITHOUT_IMPORT
    assert not unused, f"declared but never imported: {sorted(unused)}"
