"""One rule for every command: what a teacher (or model) reference names, and which family it is.

    sd-v1-4, sdxl-base, ...     a builtin UNet config (core/families/configs; meta device only)
    path/to/folder              a local diffusers pipeline folder, or a bare UNet folder
    owner/name                  a hub id (needs the hub, or its local cache)

The family comes from the pipeline's `model_index.json` class name, or for a UNet alone from its
config (SDXL's `addition_embed_type: text_time`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from core import plugins
from core.errors import UserInputError
from core.families.base import ModelFamily
from core.families.sd import StableDiffusion
from core.families.sdxl import StableDiffusionXL
from core.families.unets import (
    builtin_config,
    builtin_names,
    read_json,
    unet_folder,
    unet_from_config,
)
from core.paths import HUB_ID

# name -> family, in registration order. Other packages add theirs with `register_family` or an
# entry point; the latest registered is asked first, so a package can claim a more specific kind
# of teacher than a builtin family's (the builtins claim disjoint teachers).
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (StableDiffusion(), StableDiffusionXL())}


def register_family(family: ModelFamily | type[ModelFamily]) -> ModelFamily:
    """Make a family known to the resolver, `distill student` and recipes (an instance or its
    class; usable as a class decorator)."""
    instance = family() if isinstance(family, type) else family
    existing = FAMILIES.get(instance.name)
    if existing is not None and type(existing) is not type(instance):
        raise ValueError(f"a family named {instance.name!r} is already registered ({existing})")
    FAMILIES[instance.name] = instance
    return family


def registered_families() -> list[ModelFamily]:
    """Every family: the builtin ones and those of the `sd_distill.families` entry points."""
    for name, point in plugins.registered(plugins.FAMILIES).items():
        if name not in FAMILIES:
            register_family(point.load())
    return list(FAMILIES.values())


def family_for(pipeline_class: str | None, unet_config: dict[str, Any]) -> ModelFamily:
    families = registered_families()
    for family in reversed(families):
        if family.handles(pipeline_class, unet_config):
            return family
    known = ", ".join(f.pipeline_class.__name__ for f in families)
    raise UserInputError(f"{pipeline_class} is not a supported pipeline (supported: {known})")


def family_named(name: str) -> ModelFamily:
    families = {family.name: family for family in registered_families()}
    if name not in families:
        raise UserInputError(f"unknown model family {name!r}; known: {', '.join(families)}")
    return families[name]


@dataclass(frozen=True)
class ModelSource:
    """A resolved reference: what it is, where, and its family."""

    reference: str
    kind: Literal["builtin", "folder", "hub"]
    location: str
    family: ModelFamily
    unet_config: dict[str, Any]

    @property
    def is_pipeline(self) -> bool:
        """A whole pipeline (VAE, text encoders, ...), not only a UNet config or folder."""
        if self.kind == "builtin":
            return False
        return self.kind == "hub" or (Path(self.location) / "model_index.json").is_file()

    def meta_unet(self) -> UNet2DConditionModel:
        """The UNet on the meta device: its architecture and cost, no weights, no memory."""
        return unet_from_config(self.unet_config, device="meta")

    def unet(self) -> UNet2DConditionModel:
        """The UNet with its weights (safetensors only)."""
        if self.kind == "builtin":
            raise UserInputError(
                f"{self.reference!r} is a builtin config without weights; give a folder or hub id"
            )
        try:
            if self.kind == "folder":
                return UNet2DConditionModel.from_pretrained(
                    unet_folder(self.location), use_safetensors=True
                )
            return UNet2DConditionModel.from_pretrained(
                self.location, subfolder="unet", use_safetensors=True
            )
        except OSError as error:
            raise UserInputError(
                f"cannot load the UNet of {self.reference!r}: {_first_line(error)}"
            ) from None

    def pipeline(self, dtype: torch.dtype | None = None) -> DiffusionPipeline:
        if not self.is_pipeline:
            raise UserInputError(
                f"{self.reference!r} is not a diffusers pipeline (no model_index.json)"
            )
        return self.family.load_pipeline(self.location, dtype)


def resolve(reference: str | Path) -> ModelSource:
    """The one resolver: builtin name, local folder or hub id → its source and family."""
    reference = str(reference)
    if reference in builtin_names():
        config = builtin_config(reference)
        return ModelSource(reference, "builtin", reference, family_for(None, config), config)
    path = Path(reference).expanduser()
    if path.exists():
        folder = unet_folder(path)
        config = read_json(folder / "config.json")
        index = path / "model_index.json"
        pipeline_class = read_json(index).get("_class_name") if index.is_file() else None
        return ModelSource(
            reference, "folder", str(path), family_for(pipeline_class, config), config
        )
    if HUB_ID.match(reference) and not reference.startswith((".", "/", "~")):
        try:
            index = DiffusionPipeline.load_config(reference)
            config = dict(UNet2DConditionModel.load_config(reference, subfolder="unet"))
        except OSError as error:
            raise UserInputError(
                f"cannot reach {reference!r} on the hub: {_first_line(error)}"
            ) from None
        family = family_for(index.get("_class_name"), config)
        return ModelSource(reference, "hub", reference, family, config)
    raise UserInputError(
        f"unknown model {reference!r}: not a builtin name ({', '.join(builtin_names())}), "
        "an existing folder, or a hub id (owner/name)"
    )


def load_pipeline(
    reference: str | Path | DiffusionPipeline, dtype: torch.dtype | None = None
) -> DiffusionPipeline:
    """A pipeline as it is, or the one a reference names, loaded by its family."""
    if isinstance(reference, DiffusionPipeline):
        return reference
    return resolve(reference).pipeline(dtype)


def family_of(pipeline: DiffusionPipeline) -> ModelFamily:
    return family_for(type(pipeline).__name__, dict(pipeline.unet.config))


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
