"""Resolve a teacher given as a builtin name, a local diffusers folder or a hub id.

Builtin names (`sd-v1-4`, ...) are UNet configs shipped in `students/configs/` (facts from the
public model configs); they build on the meta device, so their architecture and cost are known
without a download. A local folder is a diffusers pipeline folder (with `unet/`) or a UNet folder.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from distill.errors import UserInputError

UNET_CLASS = "UNet2DConditionModel"


def builtin_teachers() -> list[str]:
    folder = resources.files("students") / "configs"
    return sorted(
        p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json")
    )


def builtin_config(name: str) -> dict[str, Any]:
    path = resources.files("students") / "configs" / f"{name}.json"
    return json.loads(path.read_text())


def unet_folder(path: str | Path) -> Path:
    """The UNet folder inside a pipeline folder, or the folder itself if it is a UNet folder."""
    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"teacher path {str(path)!r} is not a folder")
    for candidate in (path / "unet", path):
        config_file = candidate / "config.json"
        if config_file.is_file():
            config = _read_json(config_file)
            if config.get("_class_name") == UNET_CLASS:
                return candidate
    raise UserInputError(
        f"{str(path)!r} is neither a diffusers pipeline folder (with unet/) nor a "
        f"{UNET_CLASS} folder"
    )


def load_teacher_unet(spec: str, *, weights: bool = True) -> tuple[UNet2DConditionModel, str]:
    """(teacher UNet, display name) for a builtin name, local folder or hub id.

    Builtin names always build on the meta device (no weights exist for them here). `weights=False`
    builds any teacher on the meta device from its config alone.
    """
    if spec in builtin_teachers():
        return unet_from_config(builtin_config(spec), device="meta"), spec
    if Path(spec).exists():
        folder = unet_folder(spec)
        if not weights:
            return unet_from_config(_read_json(folder / "config.json"), device="meta"), spec
        return UNet2DConditionModel.from_pretrained(folder, use_safetensors=True), spec
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _load_from_hub(spec, weights=weights), spec
    raise UserInputError(
        f"unknown teacher {spec!r}: not a builtin name ({', '.join(builtin_teachers())}), "
        "an existing folder, or a hub id (owner/name)"
    )


def unet_from_config(
    config: dict[str, Any], device: str | torch.device = "cpu"
) -> UNet2DConditionModel:
    init_config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device(device):
            return UNet2DConditionModel.from_config(init_config)
    except (TypeError, ValueError, KeyError) as error:
        raise UserInputError(f"invalid UNet config: {error}") from error


def _load_from_hub(hub_id: str, *, weights: bool) -> UNet2DConditionModel:
    try:
        if not weights:
            config = UNet2DConditionModel.load_config(hub_id, subfolder="unet")
            return unet_from_config(dict(config), device="meta")
        return UNet2DConditionModel.from_pretrained(hub_id, subfolder="unet", use_safetensors=True)
    except OSError as error:
        first_line = (
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        )
        raise UserInputError(
            f"could not load teacher {hub_id!r} from the hub: {first_line}"
        ) from error


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserInputError(f"unreadable config {str(path)!r}: {error}") from error
