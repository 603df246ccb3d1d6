"""What every stage kind is: how one stage turns its micro-batches into a loss, and what it owns.

The trainer's loop is the same for every kind: data wait, autocast, gradient accumulation, the
step guard, the optimizer and LR schedule, the EMA, logs, checkpoints, snapshots and grids
(`distill.trainer`). A kind supplies only what differs, in this order over a stage's life:

    Options         its `options:` block in a recipe stage (pydantic, unknown keys refused)
    component       the pipeline part it trains: "unet" (handed from stage to stage) or another
                    (the offline world's "vae"), which later stages' pipelines then use
    __init__        plain values (`StageSetup`): opens its rows, builds what it owns
    prepare         the trained network before the optimizer sees it (e.g. a new embedding)
    start           after accelerate's prepare: hooks on the prepared network, extra networks
    loss_step       one loaded micro-batch -> (weighted total, raw terms), under autocast
    after_update    after each applied optimizer step (e.g. an EMA target network)
    state_dict      its own tensors for the checkpoint (whole tensors), and load_state_dict
    finish          the stage's final network before it is saved (e.g. a VAE's scaling factor)
    sampling        the pipeline its student is validated, evaluated and exported with
    sample_grid     the picture of the stage at a validation step
    close           undo `start` (hooks removed)

A new kind is one module with a `StageKind` subclass and one line: `register_stage_kind(MyKind)`
(or an `sd_distill.stage_kinds` entry point from another package; see `registry.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from diffusers import DiffusionPipeline, ModelMixin, UNet2DConditionModel
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from distill.losses import Loss
from distill.precision import Precision
from distill.teacher import FrozenTeacher, PipelineComponents


class KindOptions(BaseModel):
    """A kind's `options:` block; subclasses add fields (their constructor's plain values)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StageRows(Protocol):
    """What a stage's micro-batches are read from: `len` rows, and a micro-batch of
    (row index, epoch) samples as named tensors. `key` names the rows' content (the resume
    check's provenance)."""

    key: str

    def __len__(self) -> int: ...

    def micro_batch(self, samples: Sequence[tuple[int, int]]) -> dict[str, Any]: ...


class StageData(Protocol):
    """Opens the recipe's data the ways a kind may read it (built by the stage builder)."""

    def latents(self) -> StageRows:
        """The latent cache of the data under the stage pipeline's VAE and tokenizers."""

    def images(self) -> StageRows:
        """The preprocessed images (pixels in [-1, 1]) and their captions."""


@dataclass(frozen=True)
class ValidationSettings:
    prompts: tuple[str, ...]
    steps: int
    guidance: float
    seed: int


@dataclass(frozen=True)
class StageSetup:
    """Everything a kind is built from: plain values, never the recipe."""

    index: int
    name: str
    teacher_key: str | None  # the recipe's name of the stage teacher, for labels
    seed: int  # the run's: a sample's draws come from (seed, stage index, stream position)
    options: KindOptions
    losses: Sequence[Loss]  # the stage's loss blocks, built (empty for kinds that take none)
    components: PipelineComponents  # the stage's pipeline: VAE, text encoders, scheduler
    teacher: FrozenTeacher | None
    data: StageData
    device: torch.device
    precision: Precision
    uncond_prob: float  # classifier-free dropout of captions


class StageKind:
    """Base of every stage kind; the defaults are a kind that owns nothing beyond its loss."""

    name: ClassVar[str]
    Options: ClassVar[type[KindOptions]] = KindOptions
    component: ClassVar[str] = "unet"
    model_class: ClassVar[type[ModelMixin]] = UNet2DConditionModel
    reads_latents: ClassVar[bool] = False  # whether its rows are the latent cache
    takes_losses: ClassVar[bool] = False  # whether the stage's `losses:` blocks apply
    uses_teacher: ClassVar[bool] = False  # whether a stage of this kind may name a teacher

    def __init__(self, setup: StageSetup) -> None:
        self.setup = setup

    @property
    def rows(self) -> StageRows:
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def start(self, model: nn.Module) -> None:
        pass

    def loss_step(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor, dict]:
        raise NotImplementedError

    def after_update(self, model: nn.Module) -> None:
        pass

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if state:
            raise ValueError(f"stage kind {self.name!r} keeps no state, got {sorted(state)[:3]}")

    def finish(self, model: nn.Module) -> nn.Module:
        return model

    @classmethod
    def sampling(cls, pipeline: DiffusionPipeline, options: KindOptions) -> DiffusionPipeline:
        """The pipeline as this kind's student samples (a class method: the run's final pipeline
        is assembled even when its last stage finished in an earlier process)."""
        return pipeline

    @classmethod
    def usage(cls, options: KindOptions) -> dict[str, Any]:
        """Pipeline-call arguments its student should be sampled with (the model card says
        them); empty: the pipeline's usual defaults."""
        return {}

    def sample_grid(
        self, model: nn.Module, path: Path, settings: ValidationSettings
    ) -> Path | None:
        return None

    def close(self) -> None:
        pass
