"""Stage construction: everything one stage trains with, built from the run plan.

`StageBuilder.build(index, checkpoint)` returns a frozen `Stage`:

- its kind (`distill.kinds`), built from plain values: it opens its rows (the latent cache, or
  the images), owns its losses, taps and extra networks;
- the stage's pipeline: its teacher's, or without a teacher the init teacher's with the parts
  that earlier stages of this run trained (a VAE) in their place;
- the frozen teacher (when the stage names one);
- the trained network: the output of the latest earlier stage that trained the same part, else
  a new student from the init teacher's UNet (`students.build_student`) or a copy of its part;
- the optimizer, LR schedule and EMA, restored from `checkpoint` when resuming;
- the stream of this process's micro-batches from the stage's first step to run.

The trainer only loops over it, keeping what changes in its own loop state.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, is_wandb_available
from diffusers import ModelMixin
from diffusers.optimization import get_scheduler

from core.cpu_attention import use_kernel_attention
from core.errors import UserInputError
from core.file_backed import file_backed
from core.paths import default_cache_root
from distill.activation_checkpointing import enable_checkpointing, resolve_checkpointing
from distill.checkpoint import Checkpoint, restore_training_checkpoint
from distill.compilation import compile_regions, resolve_compile
from distill.data import (
    LatentCache,
    PreprocessSpec,
    build_latent_cache,
    load_image_text_dataset,
    streaming_fingerprint,
)
from distill.data.build import ProcessLayout
from distill.data.images import ImageRows
from distill.data.loader import MicroBatches, micro_batches
from distill.distributed_state import full_tensors, student_state
from distill.ema import DiskEMA, StudentEMA, default_every, resolve_storage
from distill.kinds import StageKind, StageRows, StageSetup
from distill.plan import RunPlan, StagePlan
from distill.precision import Precision, resolve_mixed_precision
from distill.provenance import RunProvenance
from distill.recipe import DataSpec, EMASpec, TrainingSpec
from distill.run_folder import RunFolder
from distill.run_log import TRACKERS
from distill.saved_weight_casts import step_autocast_kwargs
from distill.step import tapped_paths
from distill.step_randomness import EpochOrder
from distill.taps import unwrap_model
from distill.teacher import (
    FrozenTeacher,
    PipelineComponents,
    check_compatible,
    load_pipeline_components,
)
from students import build_student


@dataclass(frozen=True)
class Stage:
    """What one stage trains with; built at the stage's start, never changed by the loop."""

    plan: StagePlan
    kind: StageKind
    model: torch.nn.Module  # the prepared (possibly wrapped) trained network
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: StudentEMA | None
    start_step: int  # optimizer steps already done (resumed), 0 for a fresh stage
    nonfinite_skipped: int  # steps skipped before the resume point
    batches: Iterator[dict[str, Any]]  # this process's micro-batches from `start_step`

    @property
    def index(self) -> int:
        return self.plan.index

    @property
    def name(self) -> str:
        return self.plan.name


class StageBuilder:
    """Builds each stage from the plan. Keeps only the latest pipeline loaded: at SD scale each
    holds a UNet of ~860M parameters, and a stage needs only its own."""

    def __init__(
        self, plan: RunPlan, accelerator: Accelerator, folder: RunFolder, *, progress: bool = True
    ) -> None:
        self.plan = plan
        self.accelerator = accelerator
        self.folder = folder
        self.progress = progress
        training = plan.recipe.training
        self.training = training
        self.mixed_precision = resolve_mixed_precision(training.mixed_precision, training.dtype)
        self.precision = Precision.of(self.mixed_precision, training.dtype)
        self._loaded: dict[tuple, PipelineComponents] = {}
        self.provenance = RunProvenance(folder.root)

    # ------------------------------------------------------------------ pipelines and networks

    def pipeline(
        self, key: str, before: int | None = None, *, fresh: bool = False
    ) -> PipelineComponents:
        """Teacher `key`'s pipeline; for the init teacher, with the parts (other than the UNet)
        that the stages before `before` trained in place of its own. Loaded once while it is
        the latest one asked for; `fresh`: loaded again, every part as stored (a stage casts
        its teacher UNet and text encoders to the compute dtype in place)."""
        if fresh:
            self._loaded = {}
        parts = {}
        if key == self.plan.init.key and before is not None:
            parts = {
                part: folder
                for part, folder in self.folder.trained_parts(before).items()
                if part != "unet"
            }
        cache_key = (key, tuple(sorted((k, str(v)) for k, v in parts.items())))
        if cache_key not in self._loaded:
            # A reference run holds the VAE and text encoders in float64 too (cache and step).
            dtype = self.precision.weights if self.precision.is_reference else None
            components = load_pipeline_components(self.plan.teachers[key].reference, dtype)
            trained = {part: self.load_part(part, folder) for part, folder in parts.items()}
            self._loaded = {cache_key: components.with_parts(trained)}
        return self._loaded[cache_key]

    def stage_pipeline(self, index: int, *, fresh: bool = False) -> PipelineComponents:
        return self.pipeline(self.plan.stages[index].source.key, before=index, fresh=fresh)

    def load_part(self, component: str, folder: Path) -> ModelMixin:
        model_class = next(
            s.kind.model_class for s in self.plan.stages if s.kind.component == component
        )
        return model_class.from_pretrained(
            folder, use_safetensors=True, dtype=self.precision.weights
        )

    def initial_model(self, stage: StagePlan) -> ModelMixin:
        """What the stage starts from: the latest earlier output of its part; else for the UNet a
        student built from the init teacher's (its init report written), for another part a copy
        of the init pipeline's."""
        component, dtype = stage.kind.component, self.precision.weights
        previous = self.folder.trained_parts(stage.index).get(component)
        if previous is not None:
            return stage.kind.model_class.from_pretrained(
                previous, use_safetensors=True, dtype=dtype
            )
        init = self.pipeline(self.plan.init.key)
        if component != "unet":
            return copy.deepcopy(getattr(init.pipeline, component)).to(dtype)
        student, report = build_student(init.unet, self.plan.variant)
        if self.accelerator.is_main_process:
            text = json.dumps(report.to_dict(), indent=2)
            (self.folder.root / "init_report.json").write_text(text)
        return student.to(dtype)

    def check_unchanged_teacher(self, index: int) -> None:
        """Before resuming stage `index` mid-way: its teacher is the one it started with."""
        stage = self.plan.stages[index]
        self.provenance.check(
            index,
            stage.name,
            teacher_fingerprint=stage.source.fingerprint,
            mixed_precision=self.mixed_precision,  # "auto" may resolve otherwise on another host
        )

    def park_idle_parts(self, kind: StageKind) -> None:
        """The pipeline parts the stage's steps never run, held as a file map between uses
        (`core.file_backed`, on a CPU): for a kind that reads the latent cache, the VAE (SD's:
        0.31 GiB in fp32), needed again only by a sample grid or the next stage's cache. Called
        after each use (the trainer, after a grid) to drop the pages it touched."""
        vae = getattr(kind.setup.components.pipeline, "vae", None)
        if kind.reads_latents and vae is not None:
            file_backed(vae, self.folder.root)

    # ------------------------------------------------------------------ the stage

    def build(self, index: int, checkpoint: Checkpoint | None) -> Stage:
        stage, accelerator = self.plan.stages[index], self.accelerator
        model = self.initial_model(stage)
        components = self.stage_pipeline(index)
        teacher = None
        if stage.teacher is not None:
            check_compatible(model, components.unet, stage.teacher.key)
            teacher = FrozenTeacher(components.unet, self.precision.compute).to(accelerator.device)
        kind = stage.kind(
            StageSetup(
                index=index,
                name=stage.name,
                teacher_key=stage.teacher.key if stage.teacher is not None else None,
                seed=self.plan.recipe.seed,
                options=stage.options,
                losses=stage.losses,
                components=components,
                teacher=teacher,
                data=_StageData(self, index, components, resumed=checkpoint is not None),
                device=accelerator.device,
                precision=self.precision,
                uncond_prob=self.training.uncond_prob,
            )
        )
        if accelerator.is_main_process:
            self.provenance.record(
                index,
                teacher=stage.source.key,
                teacher_fingerprint=stage.source.fingerprint,
                cache_key=kind.rows.key,
                mixed_precision=self.mixed_precision,  # "auto" as this machine resolved it
            )
        self.park_idle_parts(kind)
        model = kind.prepare(model)
        enable_checkpointing(
            model,
            resolve_checkpointing(self.training.gradient_checkpointing, accelerator.device.type),
        )
        use_kernel_attention(model, accelerator.device, self.precision.compute)
        if teacher is not None:
            use_kernel_attention(teacher.unet, accelerator.device, self.precision.compute)
        spec = stage.spec
        optimizer = make_optimizer(model, spec.lr, self.training, spec.weight_decay)
        lr_scheduler = get_scheduler(
            spec.lr_schedule if spec.lr_schedule != "constant" else "constant_with_warmup",
            optimizer=optimizer,
            num_warmup_steps=spec.warmup_steps,
            num_training_steps=spec.steps,
        )
        model, optimizer = accelerator.prepare(model, optimizer)
        if resolve_compile(self.training.compile, accelerator.device.type):
            # In place: the names, taps and EMA see the same network; tapped blocks stay eager.
            student_paths, teacher_paths = tapped_paths(stage.losses)
            compile_regions(model, eager_paths=student_paths)
            if teacher is not None:
                compile_regions(teacher.unet, eager_paths=teacher_paths)
        ema = make_ema(
            model,
            stage.ema,
            stage.kind.model_class,
            accelerator.device,
            file=self.folder.root / "ema" / f"{index:02d}-{stage.name}.safetensors",
            processes=accelerator.num_processes,
        )
        kind.start(model)
        start_step, nonfinite = 0, 0
        if checkpoint is not None:
            restore_training_checkpoint(
                checkpoint,
                accelerator=accelerator,
                student=model,
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                ema=ema,
            )
            kind.load_state_dict(checkpoint.load_kind_state())
            start_step, nonfinite = checkpoint.state.step, checkpoint.state.nonfinite_skipped
        accumulation = spec.gradient_accumulation
        stream = MicroBatches(
            kind.rows,
            EpochOrder(len(kind.rows), self.plan.recipe.seed, index),
            batch_size=spec.batch_size,
            world_size=accelerator.num_processes,
            rank=accelerator.process_index,
            first=start_step * accumulation,
            count=(spec.steps - start_step) * accumulation,
        )
        workers = self.training.data_workers
        if workers is None:
            workers = min(4, max(0, (os.cpu_count() or 1) - 1))
        return Stage(
            plan=stage,
            kind=kind,
            model=model,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            ema=ema,
            start_step=start_step,
            nonfinite_skipped=nonfinite,
            batches=micro_batches(
                stream, workers=workers, pin_memory=accelerator.device.type == "cuda"
            ),
        )


class _StageData:
    """The recipe's data for one stage, opened the way its kind reads it (`StageData`)."""

    def __init__(
        self, builder: StageBuilder, index: int, components: PipelineComponents, resumed: bool
    ) -> None:
        self.builder, self.index, self.components = builder, index, components
        # A resumed stage must train on the data it started with: its key is checked before
        # anything is encoded.
        self.check_key = None
        if resumed:
            name = builder.plan.stages[index].name
            self.check_key = lambda key: builder.provenance.check(index, name, cache_key=key)  # noqa: E731

    def latents(self) -> StageRows:
        builder = self.builder
        return open_cache(
            builder.plan.recipe.data,
            self.components,
            builder.accelerator,
            seed=builder.plan.recipe.seed,
            progress=builder.progress,
            check_key=self.check_key,
        )

    def images(self) -> StageRows:
        data = self.builder.plan.recipe.data
        rows = ImageRows(_dataset(data), preprocess_spec(data), seed=self.builder.plan.recipe.seed)
        if self.check_key is not None:
            self.check_key(rows.key)
        return rows


def training_accelerator(training: TrainingSpec, logs: Path) -> Accelerator:
    """accelerate from the recipe and the launcher's settings (DDP or FSDP; DeepSpeed refused)."""
    if "wandb" in TRACKERS[training.report_to] and not is_wandb_available():
        raise UserInputError(
            f"training.report_to: {training.report_to!r} needs wandb: pip install wandb "
            "(or sd-distill[wandb])"
        )
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(training.mixed_precision, training.dtype),
        log_with=TRACKERS[training.report_to] or None,
        project_dir=str(logs),
        kwargs_handlers=[step_autocast_kwargs()],
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise UserInputError(
            "DeepSpeed is not supported (the step guard, the EMA and checkpoints are built for "
            "DDP and FSDP): launch with DDP, or FSDP for a sharded student"
        )
    if accelerator.device.type == "cuda":
        # TF32 for the fp32 work of a mixed-precision step (the optimizer's norm, fp32 losses)
        # and for fp32 runs: 10 mantissa bits for matmuls and convolutions, 8x the fp32 rate.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def preprocess_spec(data: DataSpec) -> PreprocessSpec:
    return PreprocessSpec(data.resolution, data.center_crop, data.random_flip, data.size_ids)


def _dataset(data: DataSpec):
    rows = {"image_column", "text_column", "split", "streaming", "max_samples"}
    return load_image_text_dataset(data.source, **data.model_dump(include=rows))


def open_cache(
    data: DataSpec,
    components: PipelineComponents,
    accelerator: Accelerator,
    *,
    seed: int,
    progress: bool,
    check_key: Callable[[str], None] | None = None,
) -> LatentCache:
    """The latent cache of `data` under the stage pipeline's VAE and tokenizer, built once by all
    processes together; `check_key(key)` runs before anything is encoded."""
    fingerprint = None
    if data.streaming:
        fingerprint = streaming_fingerprint(
            data.source, split=data.split, max_samples=data.max_samples
        )
    workers = data.encode_workers
    if workers is None:
        workers = min(8, max(0, (os.cpu_count() or 1) - 1))
    return build_latent_cache(
        _dataset(data),
        dataset_fingerprint=fingerprint,
        vae=components.vae,
        conditioning=components.conditioning(encoders=False),
        preprocess=preprocess_spec(data),
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
    model: torch.nn.Module, lr: float, training: TrainingSpec, weight_decay: float | None = None
) -> torch.optim.Optimizer:
    """AdamW over the trained network; `weight_decay` None: the run's."""
    if weight_decay is None:
        weight_decay = training.weight_decay
    kwargs = dict(lr=lr, betas=training.adam_betas, weight_decay=weight_decay)
    if training.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserInputError(
                "training.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes"
            ) from None
        return bnb.optim.AdamW8bit(model.parameters(), **kwargs)
    # fused: one kernel for all tensors; measured on this CPU at SD scale, the optimizer phase
    # of a step went from 2.59 s to 0.70 s (benchmarks/sd_step.py --unfused-adamw).
    return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)


def make_ema(
    model: torch.nn.Module,
    spec: EMASpec,
    model_class: type[ModelMixin],
    device: torch.device,
    *,
    file: Path | None = None,
    processes: int = 1,
) -> StudentEMA | None:
    """The EMA of the prepared network's parameters (sharded under FSDP, like them), in memory
    or in `file` (`training.ema.storage`, distill.ema)."""
    if not spec.enabled:
        return None
    parameters = list(unwrap_model(model).parameters())
    nbytes = sum(p.numel() * 4 for p in parameters)  # the average is fp32
    storage = resolve_storage(
        spec.storage, device_type=device.type, processes=processes, nbytes=nbytes
    )
    kwargs: dict[str, Any] = dict(
        decay=spec.decay,
        model_cls=model_class,
        model_config=unwrap_model(model).config,
        every=default_every(storage, spec.every),
    )
    if spec.warmup_power is not None:
        kwargs |= {"use_ema_warmup": True, "power": spec.warmup_power}
    if storage == "disk":
        if processes > 1 or file is None:
            raise UserInputError(
                "training.ema.storage: disk is for one process; with several, keep the EMA in "
                "memory (each process holds its part)"
            )
        return DiskEMA(parameters, path=file, **kwargs)
    ema = StudentEMA(parameters, **kwargs)
    ema.to(device)
    return ema


def final_model(stage: Stage, accelerator: Accelerator, finish: bool = True) -> ModelMixin | None:
    """The stage's result: a whole copy of its network with the EMA weights when EMA is on,
    passed through the kind's `finish` (unless `finish` is False: a grid during the stage).

    Collective (an FSDP network is gathered): every process calls it; the main process gets the
    model, the others None.
    """
    state = student_state(accelerator, stage.model)
    shadows = None
    if stage.ema is not None:  # with the pending steps of an EMA updated every k steps
        shadows = stage.ema.averaged(unwrap_model(stage.model).parameters())  # one at a time
        if accelerator.num_processes > 1:
            shadows = full_tensors(list(shadows))  # collective: FSDP gathers each shard
    if not accelerator.is_main_process:
        return None
    trained = unwrap_model(stage.model)
    final = stage.kind.model_class.from_config(trained.config).to(trained.dtype)
    final.load_state_dict(state)
    if shadows is not None:  # EMAModel.copy_to: shadow i -> parameter i, in parameter order
        with torch.no_grad():
            for parameter, shadow in zip(final.parameters(), shadows, strict=True):
                parameter.copy_(shadow.to(parameter.device, parameter.dtype))
    return stage.kind.finish(final.eval()) if finish else final.eval()
