"""Stage kinds: what one stage of a run trains and how (see `base.py` for the contract).

- `distill` (default): the student UNet against the target and an optional frozen teacher,
  through the stage's loss blocks.
- `consistency`: latent consistency distillation, a few-step student of any UNet.
- `autoencoder` (the offline world's, by entry point): a VAE on the data's pixels.
"""

from distill.kinds.base import (
    KindOptions,
    StageData,
    StageKind,
    StageRows,
    StageSetup,
    ValidationSettings,
)
from distill.kinds.consistency import ConsistencyKind, ConsistencyOptions
from distill.kinds.distill import DistillKind
from distill.kinds.latent import LatentStageKind
from distill.kinds.registry import (
    DEFAULT_KIND,
    STAGE_KINDS,
    register_stage_kind,
    stage_kind,
    validate_kind_options,
)

__all__ = [
    "DEFAULT_KIND",
    "STAGE_KINDS",
    "ConsistencyKind",
    "ConsistencyOptions",
    "DistillKind",
    "KindOptions",
    "LatentStageKind",
    "StageData",
    "StageKind",
    "StageRows",
    "StageSetup",
    "ValidationSettings",
    "register_stage_kind",
    "stage_kind",
    "validate_kind_options",
]
