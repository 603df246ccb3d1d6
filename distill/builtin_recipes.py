"""Recipes by file path or by builtin name: `distill run small_sd_v0` from any directory.

The builtins are the YAML files of the `recipes` package (recipes/*.yaml, recipes/compare/*.yaml),
installed with the wheel as package data. A name is the file's path inside that package without
`.yaml`: `small_sd_v0`, `compare/fashion_koala`. A path that exists always wins over a name.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from core.errors import UserInputError


def builtin_root() -> Path:
    """The installed `recipes` folder (a real folder: setuptools installs package data as files,
    and an editable install points at the checkout's)."""
    return Path(str(resources.files("recipes")))


def builtin_recipes() -> dict[str, Path]:
    """Name -> file of every builtin recipe, sorted by name."""
    root = builtin_root()
    files = sorted(root.rglob("*.yaml"))
    return {path.relative_to(root).with_suffix("").as_posix(): path for path in files}


def find_recipe(text: str | Path) -> Path:
    """An existing file as given, else the builtin of that name (`.yaml` optional); otherwise one
    line naming what was looked for."""
    path = Path(text)
    if path.is_file():
        return path
    name = str(text).removesuffix(".yaml")
    builtins = builtin_recipes()
    if name in builtins:
        return builtins[name]
    raise UserInputError(
        f"cannot read recipe {str(text)!r}: no such file, and no builtin recipe has that name "
        "(`distill recipes` lists them)"
    )


def summary(path: Path) -> str:
    """A recipe's description: its header's second comment paragraph (the first is the command
    that runs it), joined into one line."""
    paragraphs: list[list[str]] = [[]]
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text:
            paragraphs[-1].append(text)
        elif paragraphs[-1]:
            paragraphs.append([])
    return " ".join(paragraphs[1]) if len(paragraphs) > 1 else ""


def describe(path: Path) -> dict[str, object]:
    """What `distill recipes` shows of one recipe: its name, kind, stages and summary."""
    from distill.recipe import read_raw_recipe  # a recipe's `base:` brings its stages

    raw = read_raw_recipe(path)
    stages = raw.get("stages") or []
    return {
        "kind": raw.get("kind", "distill"),
        "stages": [stage.get("name", "?") for stage in stages if isinstance(stage, dict)],
        "summary": summary(path),
    }
