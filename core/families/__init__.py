"""Model families: how each kind of Stable Diffusion teacher is resolved, conditioned, assembled.

source = resolve("sdxl-base")            # or a folder, or a hub id
source.family.name                       # "sdxl"
pipeline = source.pipeline()             # a folder or hub id: the family's pipeline class
conditioning = source.family.conditioning(pipeline, encoders=True)
"""

from core.families.base import Conditioning, ModelFamily
from core.families.resolve import (
    FAMILIES,
    ModelSource,
    family_for,
    family_named,
    family_of,
    load_pipeline,
    register_family,
    registered_families,
    resolve,
)
from core.families.sd import (
    TEXT_SEQUENCE_LENGTH,
    StableDiffusion,
    TextConditioning,
    encode_captions,
)
from core.families.sdxl import SDXLConditioning, StableDiffusionXL
from core.families.unets import builtin_config, builtin_names, unet_folder, unet_from_config

__all__ = [
    "FAMILIES",
    "TEXT_SEQUENCE_LENGTH",
    "Conditioning",
    "ModelFamily",
    "ModelSource",
    "SDXLConditioning",
    "StableDiffusion",
    "StableDiffusionXL",
    "TextConditioning",
    "builtin_config",
    "builtin_names",
    "encode_captions",
    "family_for",
    "family_named",
    "family_of",
    "load_pipeline",
    "register_family",
    "registered_families",
    "resolve",
    "unet_folder",
    "unet_from_config",
]
