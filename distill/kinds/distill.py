"""`kind: distill`, the default: the student against the scheduler's target and, when the stage
names one, a frozen teacher, through the stage's loss blocks.

One step: the noised micro-batch (`LatentStageKind.noisy`) through the student and the teacher
once, the features the losses asked for read from taps registered at the stage's start, every
loss on one `StepOutputs` record (`distill.step.distillation_losses`). Plain denoising, soft
labels and layer matching (small-stable-diffusion-v0's three stages), BK-SDM's single stage and
KOALA's are all this kind with other loss blocks; so is training a UNet from scratch (the task
loss alone, the offline world's teachers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from distill.kinds.base import StageSetup
from distill.kinds.latent import LatentStageKind
from distill.step import StepTaps, distillation_losses


class DistillKind(LatentStageKind):
    name: ClassVar[str] = "distill"
    takes_losses: ClassVar[bool] = True
    uses_teacher: ClassVar[bool] = True

    def __init__(self, setup: StageSetup) -> None:
        super().__init__(setup)
        self.losses = [loss.to(setup.device) for loss in setup.losses]
        self.taps: StepTaps | None = None

    def start(self, model: nn.Module) -> None:
        self.taps = StepTaps(model, self.setup.teacher, self.losses).__enter__()

    def loss_step(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor, dict]:
        return distillation_losses(
            model, self.setup.teacher, self.noisy(batch), self.losses, self.taps
        )

    def close(self) -> None:
        if self.taps is not None:
            self.taps.__exit__(None, None, None)
            self.taps = None
