"""What every distillation loss is: a module that reads one step's record and returns named terms.

The step (`distill.step`) runs both models once and freezes what they produced into a
`StepOutputs` record; each loss reads the fields it needs and returns raw, unweighted terms. No
code outside a loss knows what a loss reads, so adding one is a new module and one registry line
(`distill.losses.registry`), never an edit to the step or the trainer.

A loss is configured by its own block in a recipe stage (`losses: {name: {weight: ..., ...}}`).
The block's schema is the loss's `Options` model, and its fields are exactly the loss's constructor
arguments (torchtune's rule: components take plain arguments, never the config object).

Feature losses compare intermediate activations over (student path, teacher path) layer pairs.
`FeatureLoss` runs the loop over pairs and the shape check; a subclass supplies only the term of
one pair, the shape rule it needs, and its default pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from core.errors import UserInputError
from distill.precision import at_least_fp32
from students import PAIR_PRESETS, block_pairs

LayerPair = tuple[str, str]  # (student module path, teacher module path)
Config = Mapping[str, Any]  # a UNet2DConditionModel config
Shape = tuple[int, ...]


@dataclass(frozen=True)
class StepOutputs:
    """What one forward of the student (and teacher) produced on one noisy batch.

    Predictions are fp32 (a bf16 MSE of near-equal tensors loses the signal); features are as the
    models made them (bf16 under autocast), keyed by module path, teacher ones detached.
    """

    student_pred: Tensor  # (B, C, h, w)
    target: Tensor  # (B, C, h, w): ε or v, per the scheduler's prediction type
    teacher_pred: Tensor | None  # (B, C, h, w), detached; None when the stage has no teacher
    student_features: Mapping[str, Tensor]
    teacher_features: Mapping[str, Tensor]
    timesteps: Tensor  # (B,)
    snr: Tensor | None = None  # (B,) ᾱ_t / (1 − ᾱ_t) of each sample's timestep
    prediction_type: str = "epsilon"  # what `target` is: "epsilon" or "v_prediction"


class LossOptions(BaseModel):
    """A loss block in a recipe: `{weight: 1.0}` plus the loss's own options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: Annotated[float, Field(ge=0.0)] = 1.0


class FeatureLossOptions(LossOptions):
    # (student module path, teacher module path) pairs, or a preset's name (students.PAIR_PRESETS:
    # stage_outputs, self_attention, koala); None: the loss's default pairs for the models.
    layer_pairs: list[LayerPair] | str | None = None

    @field_validator("layer_pairs")
    @classmethod
    def _known_preset(cls, pairs: list[LayerPair] | str | None) -> list[LayerPair] | str | None:
        if isinstance(pairs, str) and pairs not in PAIR_PRESETS:
            raise ValueError(
                f"unknown layer-pair preset {pairs!r}; presets: {', '.join(PAIR_PRESETS)}, or "
                "a list of [student path, teacher path] pairs"
            )
        return pairs


class Loss(nn.Module):
    """Base of every loss: `forward(outputs) -> {name: term}`, raw and unweighted.

    Subclasses set `name` (the recipe key and the logged term), `Options` (the recipe block's
    schema) and `reads_teacher` (whether the stage needs a teacher for it).
    """

    name: ClassVar[str]
    Options: ClassVar[type[LossOptions]] = LossOptions
    reads_teacher: ClassVar[bool] = True

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    @classmethod
    def from_options(cls, options: LossOptions, student: Config, teacher: Config) -> Loss:
        """The loss a recipe block describes, for these student and teacher UNet configs."""
        return cls(**cls.fill_defaults(options.model_dump(), student, teacher))

    @classmethod
    def fill_defaults(cls, kwargs: dict[str, Any], student: Config, teacher: Config) -> dict:
        """Constructor arguments whose defaults depend on the models (layer pairs, say)."""
        return kwargs

    def tapped_paths(self) -> tuple[list[str], list[str]]:
        """Module paths whose outputs this loss reads: (student paths, teacher paths)."""
        return [], []

    def forward(self, outputs: StepOutputs) -> dict[str, Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}"


class FeatureLoss(Loss):
    """Σ over layer pairs of `pair_term(student feature, teacher feature)`.

    The base owns the loop, the lookup of each captured feature and the shape check (`shape_error`,
    also run on meta-device shapes before training starts, see `distill.preflight`).
    """

    Options: ClassVar[type[LossOptions]] = FeatureLossOptions

    def __init__(self, weight: float = 1.0, layer_pairs: Sequence[Sequence[str]] = ()) -> None:
        super().__init__(weight)
        self.layer_pairs: list[LayerPair] = [(str(s), str(t)) for s, t in layer_pairs]
        if not self.layer_pairs:
            raise UserInputError(f"{self.name} needs at least one (student, teacher) layer pair")

    @classmethod
    def fill_defaults(cls, kwargs: dict[str, Any], student: Config, teacher: Config) -> dict:
        pairs = kwargs.get("layer_pairs")
        if pairs is None:
            kwargs["layer_pairs"] = cls.default_pairs(student, teacher)
        elif isinstance(pairs, str):
            kwargs["layer_pairs"] = PAIR_PRESETS[pairs](student, teacher)
            if not kwargs["layer_pairs"]:
                raise UserInputError(
                    f"layer_pairs: preset {pairs!r} finds no layers in these UNets"
                )
        return kwargs

    @classmethod
    def default_pairs(cls, student: Config, teacher: Config) -> list[LayerPair]:
        """The pairs used when a block gives none: every stage's output (`students.block_pairs`),
        which have the same resolution, and for the block-removal variants the same width."""
        return block_pairs(student, teacher)

    def tapped_paths(self) -> tuple[list[str], list[str]]:
        return [s for s, _ in self.layer_pairs], [t for _, t in self.layer_pairs]

    def shape_error(self, student: Shape, teacher: Shape) -> str | None:
        """Why features of these shapes cannot be paired, or None when they can."""
        return None

    def pair_term(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The loss of one pair: student feature (with grad) against the detached teacher's."""
        raise NotImplementedError

    def check_pair(self, pair: LayerPair, student: Shape, teacher: Shape) -> None:
        problem = self.shape_error(tuple(student), tuple(teacher))
        if problem is not None:
            raise UserInputError(
                f"{self.name} pair {pair}: {problem} (student {tuple(student)}, teacher "
                f"{tuple(teacher)})"
            )

    def forward(self, outputs: StepOutputs) -> dict[str, Tensor]:
        """{name: Σ over pairs, "name/<pair>": each pair's term} (only `name` is weighted; the
        per-pair terms are logged so one dominating layer is seen, BK-SDM issue #21)."""
        terms: dict[str, Tensor] = {}
        for pair in self.layer_pairs:
            student = _captured(outputs.student_features, pair[0], "student", self.name)
            teacher = _captured(outputs.teacher_features, pair[1], "teacher", self.name).detach()
            self.check_pair(pair, student.shape, teacher.shape)
            terms[f"{self.name}/{pair_label(pair)}"] = self.pair_term(student, teacher)
        return {self.name: sum(terms.values())} | terms

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pairs={len(self.layer_pairs)}"


def pair_label(pair: LayerPair) -> str:
    """How a pair's term is logged: the path, or `student~teacher` when the two differ."""
    return pair[0] if pair[0] == pair[1] else f"{pair[0]}~{pair[1]}"


class MSEPairOptions(FeatureLossOptions):
    # "none": each pair's plain MSE (mean over elements). "teacher": divided by the mean square of
    # the teacher's side, ‖s − t‖² / ‖t‖², so every pair counts on the same scale (LAPTOP-Diff,
    # Zhang et al. 2024, arXiv 2404.11098: feature terms normalized by the teacher's L2 norm).
    normalize: Literal["none", "teacher"] = "none"


def pair_mse(student: Tensor, teacher: Tensor, normalize: str) -> Tensor:
    """MSE of one pair in fp32, optionally relative to the teacher's mean square."""
    student, teacher = at_least_fp32(student), at_least_fp32(teacher)
    term = F.mse_loss(student, teacher)
    if normalize == "teacher":
        term = term / teacher.pow(2).mean().clamp_min(1e-12)
    return term


def _captured(features: Mapping[str, Tensor], path: str, side: str, loss: str) -> Tensor:
    """A captured feature; a missing one is a wiring error (the path was not tapped, or its module
    did not run in this forward)."""
    if path not in features:
        raise KeyError(
            f"{loss}: no {side} feature captured for {path!r} "
            f"(captured: {', '.join(sorted(features)) or 'none'})"
        )
    return features[path]
