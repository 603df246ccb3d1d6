"""Builtin recipes: found by name from any directory, listed by `distill recipes`, and every
recipe file of the checkout is package data of the wheel."""

from __future__ import annotations

import fnmatch
import json
import tomllib
from pathlib import Path

import pytest

from cli import main
from core.errors import UserInputError
from distill.builtin_recipes import builtin_recipes, find_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_every_recipe_file_ships_in_the_wheel() -> None:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["recipes"]
    files = [p.relative_to(ROOT / "recipes").as_posix() for p in (ROOT / "recipes").rglob("*.yaml")]
    assert files and all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), files
    assert set(builtin_recipes()) == {f.removesuffix(".yaml") for f in files}


def test_a_name_finds_the_builtin_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_recipe("small_sd_v0") == ROOT / "recipes" / "small_sd_v0.yaml"
    assert find_recipe("compare/fashion_koala.yaml").name == "fashion_koala.yaml"
    mine = tmp_path / "small_sd_v0"  # a file of that name is the user's, and wins
    mine.write_text("name: mine\n")
    assert find_recipe("small_sd_v0") == Path("small_sd_v0")
    with pytest.raises(UserInputError, match="distill recipes"):
        find_recipe("no_such_recipe")


def test_distill_recipes_lists_each_with_its_stages(capsys) -> None:
    assert main(["recipes", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["small_sd_v0"]["stages"] == ["denoise", "soft_labels", "layer_matching"]
    # A recipe built on a base shows the stages it inherits.
    assert (
        listed["compare/fashion_small_sd_laptop"]["stages"] == listed["fashion_small_sd"]["stages"]
    )
    assert listed["fashion_teacher"]["kind"] == "teacher"
    assert all(details["summary"] for details in listed.values())
    assert main(["run", "no_such_recipe"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "no_such_recipe" in error
