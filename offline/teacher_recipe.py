"""`kind: teacher` recipes: train the offline world's Fashion-MNIST teachers on the engine.

The recipe's `train:` block is `offline.teacher.TeacherSettings` (validated: an unknown key or a
wrong type is one line naming `train.<key>`). A rerun of the same recipe reuses finished
teachers, and resumes an interrupted training from its last checkpoint; another recipe in the
same folder is refused unless `--overwrite`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from core.atomic import write_text_atomic
from core.errors import UserInputError
from distill.recipe import apply_override, validation_error
from offline.teacher import TeacherSettings


class TeacherRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = "teacher"
    name: str
    output_dir: str
    train: TeacherSettings = TeacherSettings()


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
    """Train the teachers, resume their training, or reuse them when they are finished."""
    from offline.teacher import train_fashion_teachers

    recipe = load_teacher_recipe(path, overrides)
    out = Path(recipe.output_dir)
    resolved = json.loads(json.dumps(recipe.model_dump(mode="json")))
    saved = out / SETTINGS_FILE
    same = saved.is_file() and yaml.safe_load(saved.read_text()) == resolved
    if not overwrite and same and _finished(out, recipe.train.export_halfway):
        print(f"reusing the teachers in {out} (same recipe; --overwrite retrains them)")
        return 0
    if out.exists() and any(out.iterdir()) and not same:
        if not overwrite:
            raise UserInputError(
                f"{str(out)!r} holds teachers of a different recipe; pass --overwrite to retrain"
            )
    if overwrite:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(saved, yaml.safe_dump(resolved, sort_keys=False))
    folders = train_fashion_teachers(out, recipe.train, name=recipe.name, progress=progress)
    for name, folder in folders.items():
        print(f"teacher {name}: {folder}")
    return 0


def _finished(out: Path, halfway: bool) -> bool:
    keys = "ab" if halfway else "b"
    return all((out / f"teacher_{k}" / "model_index.json").is_file() for k in keys)
