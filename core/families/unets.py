"""UNet configs and construction: the builtin teacher configs, and a UNet from a config.

Builtin names (`sd-v1-4`, `sdxl-base`, ...) are UNet configs shipped in `core/families/configs/`
(facts copied from the public model configs); they build on the meta device, so an architecture
and its cost are known without a download.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from core.errors import UserInputError

UNET_CLASS = "UNet2DConditionModel"


def builtin_names() -> list[str]:
    folder = resources.files("core.families") / "configs"
    return sorted(
        p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json")
    )


def builtin_config(name: str) -> dict[str, Any]:
    if name not in builtin_names():
        raise UserInputError(
            f"unknown builtin teacher {name!r}; builtin: {', '.join(builtin_names())}"
        )
    return json.loads((resources.files("core.families") / "configs" / f"{name}.json").read_text())


def unet_from_config(
    config: dict[str, Any], device: str | torch.device = "cpu"
) -> UNet2DConditionModel:
    """A UNet2DConditionModel from a config (random weights; on "meta", no memory at all)."""
    init_config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device(device):
            return UNet2DConditionModel.from_config(init_config)
    except (TypeError, ValueError, KeyError) as error:
        raise UserInputError(f"invalid UNet config: {error}") from error


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserInputError(f"unreadable config {str(path)!r}: {error}") from error


def unet_folder(path: str | Path) -> Path:
    """The UNet folder inside a pipeline folder, or the folder itself if it is a UNet folder."""
    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"{str(path)!r} is not a folder")
    for candidate in (path / "unet", path):
        config_file = candidate / "config.json"
        if config_file.is_file() and read_json(config_file).get("_class_name") == UNET_CLASS:
            return candidate
    raise UserInputError(
        f"{str(path)!r} is neither a diffusers pipeline folder (with unet/) nor a "
        f"{UNET_CLASS} folder"
    )
