"""Stage construction: everything one stage trains with, built from the recipe.

`StageBuilder.build(index, checkpoint)` returns a `StageContext`: the stage teacher (frozen), the
latent cache its VAE and text encoder built, the student (stage 1: initialized from the init
teacher; later stages: the previous stage's final student), the optimizer, LR schedule, EMA and
losses, all restored from `checkpoint` when resuming. The trainer only loops over it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from core.errors import UserInputError
from core.families import Conditioning
from core.paths import default_cache_root
from distill.checkpoint import Checkpoint, restore_training_checkpoint
from distill.data import (
    LatentCache,
    PreprocessSpec,
    build_latent_cache,
    load_image_text_dataset,
    streaming_fingerprint,
)
from distill.data.build import ProcessLayout
from distill.data.loader import MicroBatches, micro_batches
from distill.distributed_state import full_tensors, student_state
from distill.losses import Loss, build_losses
from distill.precision import Precision
from distill.provenance import RunProvenance, teacher_fingerprint
from distill.recipe import DataSpec, Recipe, StageSpec, TrainingSpec
from distill.run_folder import RunFolder
from distill.step_randomness import EpochOrder
from distill.taps import unwrap_model
from distill.teacher import (
    FrozenTeacher,
    PipelineComponents,
    check_compatible,
    load_pipeline_components,
)
from distill.validation import save_validation_grid
from students import build_student


@dataclass
class StageContext:
    """Everything one stage trains with; rebuilt at each stage start."""

    index: int
    spec: StageSpec
    components: PipelineComponents  # VAE / text encoder / scheduler that built the cache
    teacher: FrozenTeacher | None
    cache: LatentCache
    conditioning: Conditioning  # a batch's cached fields -> the UNet's conditioning inputs
    order: EpochOrder
    noise_scheduler: DDPMScheduler
    student: torch.nn.Module  # prepared (possibly wrapped) student
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMAModel | None
    losses: list[Loss]
    start_step: int = 0
    nonfinite_skipped: int = 0
    consecutive_nonfinite: int = 0
    last_terms: dict[str, float] = field(default_factory=dict)
    last_total: float | None = None
    grad_norm: float = float("nan")
    batches: Iterator[dict[str, Any]] = iter(())  # this process's micro-batches from start_step
    data_wait_s: float = 0.0  # time the last optimizer step waited for its data


class StageBuilder:
    """Builds each stage's context from the recipe. Keeps only the latest teacher pipeline: at SD
    scale each holds a UNet of ~860M parameters, and a stage needs only its own."""

    def __init__(
        self,
        recipe: Recipe,
        accelerator: Accelerator,
        folder: RunFolder,
        *,
        progress: bool = True,
    ) -> None:
        self.recipe = recipe
        self.accelerator = accelerator
        self.folder = folder
        self.progress = progress
        self.run_dir = Path(recipe.output_dir)
        self.precision = Precision.of(recipe.training.mixed_precision, recipe.training.dtype)
        self._components: dict[str, PipelineComponents] = {}
        self.provenance = RunProvenance(self.run_dir)

    def components(self, key: str) -> PipelineComponents:
        """The pipeline behind teacher `key`, loaded once while it is the latest one asked for."""
        if key not in self._components:
            # A reference run holds the VAE and text encoders in float64 too (cache and step).
            dtype = self.precision.weights if self.precision.is_reference else None
            self._components = {key: load_pipeline_components(self.recipe.teachers[key], dtype)}
        return self._components[key]

    def source_key(self, index: int) -> str:
        """The teacher whose UNet (if any), VAE and text encoder stage `index` uses."""
        return self.recipe.stages[index].teacher or self.recipe.student.init_from

    def check_unchanged_teacher(self, index: int) -> None:
        """Before resuming stage `index` mid-way: its teacher is the one it started with."""
        source = self.recipe.teachers[self.source_key(index)]
        self.provenance.check(
            index, self.recipe.stages[index].name, teacher_fingerprint=teacher_fingerprint(source)
        )

    def build(self, index: int, checkpoint: Checkpoint | None) -> StageContext:
        recipe, spec, accelerator = self.recipe, self.recipe.stages[index], self.accelerator
        student = self.initial_student(index)
        components = self.components(self.source_key(index))
        teacher = None
        if spec.teacher is not None:
            check_compatible(student, components.unet, spec.teacher)
            teacher = FrozenTeacher(components.unet, self.precision.compute).to(accelerator.device)
        losses = build_losses(spec.losses, student.config, components.unet.config)
        check_key = None
        if checkpoint is not None:  # a resumed stage must train on the data it started with
            check_key = lambda key: self.provenance.check(index, spec.name, cache_key=key)  # noqa: E731
        cache = open_cache(
            recipe.data,
            components,
            accelerator,
            seed=recipe.seed,
            progress=self.progress,
            check_key=check_key,
        )
        if accelerator.is_main_process:
            self.provenance.record(
                index,
                teacher=self.source_key(index),
                teacher_fingerprint=teacher_fingerprint(recipe.teachers[self.source_key(index)]),
                cache_key=cache.meta["key"],
            )
        if recipe.training.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        optimizer = make_optimizer(student, spec.lr, recipe.training)
        lr_scheduler = get_scheduler(
            spec.lr_schedule if spec.lr_schedule != "constant" else "constant_with_warmup",
            optimizer=optimizer,
            num_warmup_steps=spec.warmup_steps,
            num_training_steps=spec.steps,
        )
        student, optimizer = accelerator.prepare(student, optimizer)
        ema = None
        if recipe.training.ema.enabled:  # from the prepared parameters: sharded under FSDP
            ema = EMAModel(
                unwrap_model(student).parameters(),
                decay=recipe.training.ema.decay,
                model_cls=UNet2DConditionModel,
                model_config=unwrap_model(student).config,
            )
            ema.to(accelerator.device)
        start_step, nonfinite = 0, 0
        if checkpoint is not None:
            restore_training_checkpoint(
                checkpoint,
                accelerator=accelerator,
                student=student,
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                ema=ema,
            )
            start_step, nonfinite = checkpoint.state.step, checkpoint.state.nonfinite_skipped
        for loss in losses:
            loss.to(accelerator.device)
        order = EpochOrder(len(cache), recipe.seed, index)
        accumulation = spec.gradient_accumulation
        stream = MicroBatches(
            cache,
            order,
            batch_size=spec.batch_size,
            world_size=accelerator.num_processes,
            rank=accelerator.process_index,
            first=start_step * accumulation,
            count=(spec.steps - start_step) * accumulation,
        )
        workers = recipe.training.data_workers
        if workers is None:
            workers = min(4, max(0, (os.cpu_count() or 1) - 1))
        return StageContext(
            index=index,
            spec=spec,
            components=components,
            teacher=teacher,
            cache=cache,
            conditioning=components.conditioning(encoders=True, device=accelerator.device),
            order=order,
            noise_scheduler=components.training_scheduler(),
            student=student,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            ema=ema,
            losses=losses,
            start_step=start_step,
            nonfinite_skipped=nonfinite,
            batches=micro_batches(
                stream, workers=workers, pin_memory=accelerator.device.type == "cuda"
            ),
        )

    def initial_student(self, index: int) -> UNet2DConditionModel:
        """Stage 1 builds the student from the init teacher; later stages continue from the
        previous stage's final student (its EMA weights when EMA is on)."""
        if index > 0:
            previous = self.folder.stage_unet(index - 1)
            if not previous.is_dir():
                raise UserInputError(f"stage {index + 1} needs the previous stage's {previous}")
            return UNet2DConditionModel.from_pretrained(
                previous, use_safetensors=True, dtype=self.precision.weights
            )
        init = self.components(self.recipe.student.init_from)
        student, report = build_student(init.unet, self.recipe.student.shape())
        if self.accelerator.is_main_process:
            (self.run_dir / "init_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        return student.to(self.precision.weights)


def training_accelerator(training: TrainingSpec, logs: Path) -> Accelerator:
    """accelerate from the recipe and the launcher's settings (DDP or FSDP; DeepSpeed refused)."""
    accelerator = Accelerator(
        mixed_precision=training.mixed_precision, log_with="tensorboard", project_dir=str(logs)
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise UserInputError(
            "DeepSpeed is not supported (the step guard, the EMA and checkpoints are built for "
            "DDP and FSDP): launch with DDP, or FSDP for a sharded student"
        )
    return accelerator


def open_cache(
    data: DataSpec,
    components: PipelineComponents,
    accelerator: Accelerator,
    *,
    seed: int,
    progress: bool,
    check_key: Callable[[str], None] | None = None,
) -> LatentCache:
    """The latent cache of `data` under the stage teacher's VAE and tokenizer, built once by all
    processes together; `check_key(key)` runs before anything is encoded."""
    rows = {"image_column", "text_column", "split", "streaming", "max_samples"}
    dataset = load_image_text_dataset(data.source, **data.model_dump(include=rows))
    fingerprint = None
    if data.streaming:
        fingerprint = streaming_fingerprint(
            data.source, split=data.split, max_samples=data.max_samples
        )
    workers = data.encode_workers
    if workers is None:
        workers = min(8, max(0, (os.cpu_count() or 1) - 1))
    return build_latent_cache(
        dataset,
        dataset_fingerprint=fingerprint,
        vae=components.vae,
        conditioning=components.conditioning(encoders=False),
        preprocess=PreprocessSpec(data.resolution, data.center_crop, data.random_flip),
        cache_root=Path(data.cache_dir) if data.cache_dir else default_cache_root(),
        batch_size=data.encode_batch_size,
        device=accelerator.device,
        storage_dtype=data.cache_dtype,
        progress=progress,
        rows_per_shard=data.rows_per_shard,
        layout=ProcessLayout.of(
            accelerator.process_index, accelerator.num_processes, per_node=data.cache_per_node
        ),
        num_workers=workers,
        wait_timeout=data.cache_timeout_hours * 3600,
        seed=seed,
        check_key=check_key,
    )


def make_optimizer(
    student: torch.nn.Module, lr: float, training: TrainingSpec
) -> torch.optim.Optimizer:
    kwargs = dict(lr=lr, betas=training.adam_betas, weight_decay=training.weight_decay)
    if training.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserInputError(
                "training.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes"
            ) from None
        return bnb.optim.AdamW8bit(student.parameters(), **kwargs)
    # fused: one kernel for all tensors; measured on this CPU at SD scale, the optimizer phase
    # of a step went from 2.59 s to 0.70 s (benchmarks/sd_step.py --unfused-adamw).
    return torch.optim.AdamW(student.parameters(), fused=True, **kwargs)


def final_student(ctx: StageContext, accelerator: Accelerator) -> UNet2DConditionModel | None:
    """The stage's result: a whole copy of the student with the EMA weights when EMA is on.

    Collective (an FSDP student is gathered): every process calls it; the main process gets the
    model, the others None.
    """
    state = student_state(accelerator, ctx.student)
    shadows = full_tensors(ctx.ema.shadow_params) if ctx.ema is not None else None
    if not accelerator.is_main_process:
        return None
    trained = unwrap_model(ctx.student)
    final = UNet2DConditionModel.from_config(trained.config).to(trained.dtype)
    final.load_state_dict(state)
    if shadows is not None:  # EMAModel.copy_to: shadow i -> parameter i, in parameter order
        with torch.no_grad():
            for parameter, shadow in zip(final.parameters(), shadows, strict=True):
                parameter.copy_(shadow.to(parameter.device, parameter.dtype))
    return final.eval()


def save_stage_grid(
    ctx: StageContext,
    student: UNet2DConditionModel,
    accelerator: Accelerator,
    training: TrainingSpec,
    seed: int,
    path: Path,
) -> Path:
    """A sample grid: the stage teacher's row above the student's, same prompts and seeds."""
    rows = {}
    if ctx.teacher is not None:
        rows[f"teacher {ctx.spec.teacher}"] = ctx.components.with_unet(ctx.teacher.unet)
    rows["student"] = ctx.components.with_unet(student)
    with accelerator.autocast():  # a bf16 teacher beside fp32 VAE and text encoder
        return save_validation_grid(
            rows,
            training.validation_prompts,
            path,
            seed=seed,
            num_inference_steps=training.validation_steps,
            guidance_scale=training.validation_guidance,
            device=accelerator.device,
        )
