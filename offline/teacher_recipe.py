"""`kind: teacher` recipes: train the offline world's Fashion-MNIST teachers.

The recipe's `train:` mapping is exactly the keyword arguments of `train_fashion_teachers`;
pydantic validates them against its signature, so an unknown key or a wrong type is one line
naming the key, and the recipe cannot drift from the code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, validate_call

from core.errors import UserInputError
from distill.recipe import apply_override, validation_error


class TeacherRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = "teacher"
    name: str
    output_dir: str
    train: dict[str, Any] = {}


SETTINGS_FILE = "recipe.yaml"


def load_teacher_recipe(path: Path, overrides: list[str]) -> TeacherRecipe:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UserInputError(f"cannot read recipe {str(path)!r}: {error}") from None
    for override in overrides:
        apply_override(raw, override)
    try:
        return TeacherRecipe.model_validate(raw)
    except ValidationError as error:
        raise validation_error(error, str(path)) from None


def run_teacher_recipe(
    path: Path, overrides: list[str], *, overwrite: bool = False, progress: bool = True
) -> int:
    """Train the teachers, or reuse them when a finished run of the same recipe is there."""
    from offline.teacher import train_fashion_teachers

    recipe = load_teacher_recipe(path, overrides)
    out = Path(recipe.output_dir)
    resolved = recipe.model_dump(mode="json")
    if not overwrite and _finished(out, resolved):
        print(f"reusing the teachers in {out} (same recipe; --overwrite retrains them)")
        return 0
    if out.exists() and (out / SETTINGS_FILE).exists():
        if not overwrite:
            raise UserInputError(
                f"{str(out)!r} holds teachers of a different or unfinished recipe; "
                "pass --overwrite to retrain"
            )
        shutil.rmtree(out)
    train = validate_call(train_fashion_teachers, config=ConfigDict(arbitrary_types_allowed=True))
    try:
        folders = train(out, progress=progress, **recipe.train)
    except ValidationError as error:
        raise validation_error(error, str(path), prefix="train.") from None
    (out / SETTINGS_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))
    for name, folder in folders.items():
        print(f"teacher {name}: {folder}")
    return 0


def _finished(out: Path, resolved: dict[str, Any]) -> bool:
    settings = out / SETTINGS_FILE
    if not settings.is_file():
        return False
    same = yaml.safe_load(settings.read_text()) == json.loads(json.dumps(resolved))
    return same and all((out / f"teacher_{k}" / "model_index.json").is_file() for k in "ab")
