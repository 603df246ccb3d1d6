"""The distillation trainer: a recipe's stages, one after another, on accelerate.

One code path for CPU, one GPU, many GPUs and many nodes (`accelerate launch`; DDP, FSDP or
DeepSpeed per accelerate's config). `train()` reads top to bottom:

    for each stage from the resume point:
        setup the stage   (teacher, cache, student from the previous stage, optimizer, EMA, taps)
        for each step:    loss step (micro-batches) -> clip -> optimizer -> EMA -> log/ckpt/grid
        finish the stage  (final checkpoint, the stage's student in diffusers format)
    save the final student pipeline

Only the main process writes (caches, checkpoints, students, grids, logs).
"""

from __future__ import annotations

import json
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from distill.checkpoint import Checkpoint, TrainingState, latest_checkpoint, save_checkpoint
from distill.data import (
    LatentCache,
    PreprocessSpec,
    build_latent_cache,
    load_image_text_dataset,
    streaming_fingerprint,
)
from distill.data.cache import flip_choice, sample_latents
from distill.errors import UserInputError
from distill.losses import build_losses, task_target
from distill.paths import default_cache_root
from distill.recipe import Recipe, StageSpec
from distill.step import NoisyBatch, distillation_losses
from distill.step_randomness import EpochOrder, StreamSample, sample_generator
from distill.taps import unwrap_model
from distill.teacher import (
    FrozenTeacher,
    PipelineComponents,
    check_compatible,
    load_pipeline_components,
)
from distill.validation import save_validation_grid
from students import block_pairs, build_student

MIXED_PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); the last checkpoint is intact."""


@dataclass
class StageContext:
    """Everything one stage trains with; rebuilt at each stage start."""

    index: int
    spec: StageSpec
    components: PipelineComponents  # VAE / text encoder / scheduler that built the cache
    teacher: FrozenTeacher | None
    cache: LatentCache
    order: EpochOrder
    noise_scheduler: DDPMScheduler
    student: torch.nn.Module  # prepared (possibly wrapped) student
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMAModel | None
    losses: list[torch.nn.Module]
    layer_pairs: list[tuple[str, str]]
    start_step: int = 0
    nonfinite_skipped: int = 0
    consecutive_nonfinite: int = 0
    last_terms: dict[str, float] = field(default_factory=dict)
    grad_norm: float = float("nan")


class DistillationTrainer:
    def __init__(
        self,
        recipe: Recipe,
        *,
        accelerator: Accelerator | None = None,
        resume: bool | None = None,
        progress: bool = True,
        stop_after_steps: int | None = None,
    ) -> None:
        """`resume`: True = must resume, False = start fresh, None = resume if a checkpoint exists.

        `stop_after_steps` ends `train()` after that many optimizer steps in this process, as an
        interruption would (used to test resumption).
        """
        self.recipe = recipe
        self.run_dir = Path(recipe.output_dir)
        self.resume = resume
        self.progress = progress
        self.stop_after_steps = stop_after_steps
        self.accelerator = accelerator or Accelerator(
            mixed_precision=recipe.training.mixed_precision,
            log_with="tensorboard",
            project_dir=str(self.run_dir / "logs"),
        )
        self.mixed_dtype = MIXED_PRECISION_DTYPES[recipe.training.mixed_precision]
        self._components: dict[str, PipelineComponents] = {}
        self._steps_this_process = 0
        self._log_file: Path = self.run_dir / "logs" / "metrics.jsonl"

    # ------------------------------------------------------------------ setup / cleanup

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def stage_dir(self, index: int) -> Path:
        return self.run_dir / "stages" / f"{index + 1:02d}-{self.recipe.stages[index].name}"

    def setup(self) -> Checkpoint | None:
        """Create the run folder (main process) and find the checkpoint to resume from."""
        checkpoint = latest_checkpoint(self.checkpoint_dir)
        if self.resume is True and checkpoint is None:
            raise UserInputError(f"--resume: no checkpoint in {str(self.checkpoint_dir)!r}")
        if self.resume is False:
            checkpoint = None
        if self.accelerator.is_main_process:
            (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(
                yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False)
            )
        self.accelerator.init_trackers(self.recipe.name)
        self.accelerator.wait_for_everyone()
        return checkpoint

    def cleanup(self) -> None:
        self.accelerator.end_training()

    # ------------------------------------------------------------------ the run

    def train(self) -> Path | None:
        """Run every stage from the resume point; returns the final pipeline folder, or None when
        stopped early by `stop_after_steps`."""
        checkpoint = self.setup()
        first_stage = checkpoint.state.stage_index if checkpoint else 0
        if checkpoint and self._stage_is_finished(checkpoint):
            first_stage, checkpoint = first_stage + 1, None
        try:
            for index in range(first_stage, len(self.recipe.stages)):
                resume_from = checkpoint if checkpoint and index == first_stage else None
                context = self._setup_stage(index, resume_from)
                finished = self._train_stage(context)
                if not finished:
                    return None
                self._finish_stage(context)
            return self._save_final_pipeline()
        finally:
            self.cleanup()

    def _stage_is_finished(self, checkpoint: Checkpoint) -> bool:
        index = checkpoint.state.stage_index
        return (
            checkpoint.state.step >= self.recipe.stages[index].steps
            and (self.stage_dir(index) / "unet").is_dir()
        )

    def _train_stage(self, ctx: StageContext) -> bool:
        spec = ctx.spec
        bar = tqdm(
            total=spec.steps,
            initial=ctx.start_step,
            desc=f"stage {ctx.index + 1}/{len(self.recipe.stages)} {spec.name}",
            disable=not (self.progress and self.accelerator.is_local_main_process),
            dynamic_ncols=True,
        )
        last_time = time.perf_counter()
        for step in range(ctx.start_step, spec.steps):
            terms = self._optimizer_step(ctx, step)
            done = step + 1
            if terms is not None:
                ctx.last_terms = terms
            now = time.perf_counter()
            its = 1.0 / max(now - last_time, 1e-9)
            last_time = now
            bar.update(1)
            bar.set_postfix(
                {k: f"{v:.4g}" for k, v in ctx.last_terms.items()} | {"it/s": f"{its:.2f}"}
            )
            if done % self.recipe.training.log_every == 0 or done == spec.steps:
                self._log(ctx, done, its)
            if done % self.recipe.training.checkpoint_every == 0 and done < spec.steps:
                self._save_checkpoint(ctx, done)
            every = self.recipe.training.validate_every
            if every and done % every == 0 and done < spec.steps:
                self._validate(ctx, done)
            self._steps_this_process += 1
            if (
                self.stop_after_steps is not None
                and self._steps_this_process >= self.stop_after_steps
            ):
                bar.close()
                return False
        bar.close()
        return True

    def _optimizer_step(self, ctx: StageContext, step: int) -> dict[str, float] | None:
        """One optimizer step over `gradient_accumulation` micro-batches.

        Returns the raw loss terms (averaged over micro-batches), or None if the step was skipped
        because the loss was not finite on some process.
        """
        accelerator = self.accelerator
        accumulation = ctx.spec.gradient_accumulation
        ctx.student.train()
        totals: dict[str, torch.Tensor] = {}
        finite = True
        for micro in range(accumulation):
            sync = micro == accumulation - 1
            with ExitStack() as stack:
                if not sync:
                    stack.enter_context(accelerator.no_sync(ctx.student))
                total, terms = self._loss_step(ctx, step, micro)
                # Every process must agree before backward, or DDP's all-reduce would hang.
                flag = torch.tensor(
                    [float(torch.isfinite(total).item())], device=accelerator.device
                )
                if accelerator.reduce(flag, reduction="sum").item() < accelerator.num_processes:
                    finite = False
                    break
                accelerator.backward(total / accumulation)
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value.float() / accumulation
        if not finite:
            ctx.optimizer.zero_grad(set_to_none=True)
            ctx.nonfinite_skipped += 1
            ctx.consecutive_nonfinite += 1
            if ctx.consecutive_nonfinite >= self.recipe.training.max_consecutive_nonfinite:
                raise TrainingStopped(
                    f"stage {ctx.spec.name!r}: the loss was NaN/Inf for "
                    f"{ctx.consecutive_nonfinite} steps in a row at step {step + 1}; stopped. The "
                    f"last good checkpoint in {str(self.checkpoint_dir)!r} is intact "
                    "(lower the learning rate or use bf16 instead of fp16)"
                )
            with warnings.catch_warnings():
                # The schedule follows the step index, skipped steps included; torch warns
                # because no optimizer.step() preceded this one.
                warnings.simplefilter("ignore", UserWarning)
                ctx.lr_scheduler.step()
            return None
        ctx.consecutive_nonfinite = 0
        # Clips when max_grad_norm is set; with inf it only measures. The norm (before clipping,
        # of the process-averaged gradient) is logged with the loss terms.
        max_norm = self.recipe.training.max_grad_norm or float("inf")
        ctx.grad_norm = float(accelerator.clip_grad_norm_(ctx.student.parameters(), max_norm))
        ctx.optimizer.step()
        ctx.lr_scheduler.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        if ctx.ema is not None:
            ctx.ema.step(unwrap_model(ctx.student).parameters())
        # Logged terms are the mean over processes, i.e. over the whole global batch.
        names = list(totals)
        means = accelerator.reduce(torch.stack([totals[n] for n in names]), reduction="mean")
        return dict(zip(names, means.tolist(), strict=True))

    def _loss_step(
        self, ctx: StageContext, step: int, micro: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch: student (and teacher) on the same noisy latents."""
        accelerator = self.accelerator
        device = accelerator.device
        batch_size = ctx.spec.batch_size
        samples = ctx.order.batch(
            step * ctx.spec.gradient_accumulation + micro,
            batch_size,
            accelerator.num_processes,
            accelerator.process_index,
        )
        batch = self._batch(ctx, samples)
        # One generator per sample, drawn in a fixed order: posterior, noise, timestep, dropout.
        generators = [sample_generator(self.recipe.seed, ctx.index, s.position) for s in samples]
        latents = sample_latents(
            batch["latent_mean"],
            batch["latent_std"],
            ctx.cache.scaling_factor,
            generators,
            shift_factor=ctx.cache.shift_factor,
        )  # (B, 4, h, w)
        noise = randn_tensor(latents.shape, generator=generators)
        num_timesteps = ctx.noise_scheduler.config.num_train_timesteps
        timesteps = torch.cat(
            [torch.randint(0, num_timesteps, (1,), generator=g) for g in generators]
        )
        drop = torch.cat([torch.rand(1, generator=g) for g in generators]) < (
            self.recipe.training.uncond_prob
        )
        text = batch["text_embedding"]  # (B, 77, D)
        text = torch.where(drop[:, None, None], ctx.cache.empty_text_embedding[None], text)

        latents, noise, timesteps, text = (t.to(device) for t in (latents, noise, timesteps, text))
        noisy = ctx.noise_scheduler.add_noise(latents, noise, timesteps)
        target = task_target(
            ctx.noise_scheduler.config.prediction_type,
            latents,
            noise,
            timesteps,
            ctx.noise_scheduler.alphas_cumprod.to(device),
        )

        with accelerator.autocast():
            total, terms = distillation_losses(
                ctx.student,
                ctx.teacher,
                NoisyBatch(noisy, timesteps, text, target),
                ctx.losses,
                ctx.spec.loss_weights,
                ctx.layer_pairs,
            )
        return total, {name: term.detach() for name, term in terms.items()}

    def _batch(self, ctx: StageContext, samples: list[StreamSample]) -> dict[str, torch.Tensor]:
        """Stacked cache items; which flip a sample shows depends on (seed, epoch, index)."""
        stored_flips = ctx.cache.num_variants == 2
        items = [
            ctx.cache.item(
                s.index,
                variant=int(stored_flips and flip_choice(self.recipe.seed, s.epoch, s.index)),
            )
            for s in samples
        ]
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}

    # ------------------------------------------------------------------ stage setup / finish

    def _load_components(self, key: str) -> PipelineComponents:
        """The pipeline behind teacher `key`. Only the latest one is kept: at SD scale each holds
        a UNet of ~860M parameters, and a stage needs only its own teacher."""
        if key not in self._components:
            self._components = {key: load_pipeline_components(self.recipe.teachers[key])}
        return self._components[key]

    def _setup_stage(self, index: int, checkpoint: Checkpoint | None) -> StageContext:
        recipe, spec, accelerator = self.recipe, self.recipe.stages[index], self.accelerator
        student = self._initial_student(index)
        components = self._load_components(spec.teacher or recipe.student.init_from)
        teacher = None
        if spec.teacher is not None:
            check_compatible(student, components.unet, spec.teacher)
            teacher = FrozenTeacher(components.unet, self.mixed_dtype).to(accelerator.device)
        layer_pairs = (
            [tuple(pair) for pair in spec.layer_pairs]
            if spec.layer_pairs
            else block_pairs(student.config, components.unet.config)
        )

        cache = self._cache(components)
        if recipe.training.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        optimizer = self._optimizer(student, spec)
        lr_scheduler = get_scheduler(
            spec.lr_schedule if spec.lr_schedule != "constant" else "constant_with_warmup",
            optimizer=optimizer,
            num_warmup_steps=spec.warmup_steps,
            num_training_steps=spec.steps,
        )
        ema = None
        if recipe.training.ema.enabled:
            ema = EMAModel(
                student.parameters(),
                decay=recipe.training.ema.decay,
                model_cls=UNet2DConditionModel,
                model_config=student.config,
            )
        start_step, nonfinite = 0, 0
        if checkpoint is not None:
            student.load_state_dict(checkpoint.load_student())
            state = checkpoint.load_optimizer()
            optimizer.load_state_dict(state["optimizer"])
            lr_scheduler.load_state_dict(state["lr_scheduler"])
            if ema is not None:
                self._load_ema(ema, checkpoint, state)
            start_step, nonfinite = checkpoint.state.step, checkpoint.state.nonfinite_skipped
        student, optimizer = accelerator.prepare(student, optimizer)
        if ema is not None:
            ema.to(accelerator.device)
        losses = build_losses(spec.loss_weights, max_positions=spec.similarity_max_positions)
        for loss in losses:
            loss.to(accelerator.device)
        return StageContext(
            index=index,
            spec=spec,
            components=components,
            teacher=teacher,
            cache=cache,
            order=EpochOrder(len(cache), recipe.seed, index),
            noise_scheduler=components.training_scheduler(),
            student=student,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            ema=ema,
            losses=losses,
            layer_pairs=layer_pairs,
            start_step=start_step,
            nonfinite_skipped=nonfinite,
        )

    def _initial_student(self, index: int) -> UNet2DConditionModel:
        """Stage 1 builds the student from the init teacher; later stages continue from the
        previous stage's final student (its EMA weights when EMA is on)."""
        if index > 0:
            previous = self.stage_dir(index - 1) / "unet"
            if not previous.is_dir():
                raise UserInputError(f"stage {index + 1} needs the previous stage's {previous}")
            return UNet2DConditionModel.from_pretrained(previous, use_safetensors=True)
        init = self._load_components(self.recipe.student.init_from)
        student, report = build_student(init.unet, self.recipe.student.variant)
        if self.accelerator.is_main_process:
            (self.run_dir / "init_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        return student if student.dtype == torch.float32 else student.to(torch.float32)

    def _cache(self, components: PipelineComponents) -> LatentCache:
        data = self.recipe.data
        dataset = load_image_text_dataset(
            data.source,
            image_column=data.image_column,
            text_column=data.text_column,
            split=data.split,
            streaming=data.streaming,
            max_samples=data.max_samples,
        )
        fingerprint = (
            streaming_fingerprint(data.source, split=data.split, max_samples=data.max_samples)
            if data.streaming
            else None
        )
        return build_latent_cache(
            dataset,
            dataset_fingerprint=fingerprint,
            vae=components.vae,
            text_encoder=components.text_encoder,
            tokenizer=components.tokenizer,
            preprocess=PreprocessSpec(data.resolution, data.center_crop, data.random_flip),
            cache_root=Path(data.cache_dir) if data.cache_dir else default_cache_root(),
            batch_size=data.encode_batch_size,
            device=self.accelerator.device,
            progress=self.progress,
            accelerator=self.accelerator,
            seed=self.recipe.seed,
        )

    def _optimizer(self, student: torch.nn.Module, spec: StageSpec) -> torch.optim.Optimizer:
        training = self.recipe.training
        kwargs = dict(lr=spec.lr, betas=training.adam_betas, weight_decay=training.weight_decay)
        if training.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise UserInputError(
                    "training.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes"
                ) from None
            return bnb.optim.AdamW8bit(student.parameters(), **kwargs)
        # fused: one kernel for all tensors; measured on this CPU at SD scale, the optimizer phase
        # of a step went from 2.59 s to 0.70 s (benchmarks/sd_step.py --fused-adamw).
        return torch.optim.AdamW(student.parameters(), fused=True, **kwargs)

    @staticmethod
    def _load_ema(ema: EMAModel, checkpoint: Checkpoint, state: dict) -> None:
        shadow = checkpoint.load_ema()
        if shadow is None:
            raise UserInputError(f"checkpoint {checkpoint.path} has no EMA weights; EMA is on")
        ema.load_state_dict(
            state["ema"] | {"shadow_params": [shadow[f"{i}"] for i in range(len(shadow))]}
        )

    def _save_checkpoint(self, ctx: StageContext, step: int) -> None:
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            ema_tensors, ema_state = None, None
            if ctx.ema is not None:
                ema_state = {k: v for k, v in ctx.ema.state_dict().items() if k != "shadow_params"}
                ema_tensors = {f"{i}": p for i, p in enumerate(ctx.ema.shadow_params)}
            save_checkpoint(
                self.checkpoint_dir,
                TrainingState(ctx.index, ctx.spec.name, step, ctx.nonfinite_skipped),
                student=accelerator.unwrap_model(ctx.student).state_dict(),
                ema=ema_tensors,
                optimizer={
                    "optimizer": ctx.optimizer.state_dict(),
                    "lr_scheduler": ctx.lr_scheduler.state_dict(),
                    "ema": ema_state,
                },
                keep_last=self.recipe.training.keep_last,
            )
        accelerator.wait_for_everyone()

    def _final_student(self, ctx: StageContext) -> UNet2DConditionModel:
        """The stage's result: a copy of the student carrying the EMA weights when EMA is on."""
        student = self.accelerator.unwrap_model(ctx.student)
        final = UNet2DConditionModel.from_config(student.config)
        final.load_state_dict(student.state_dict())
        if ctx.ema is not None:
            ctx.ema.copy_to(final.parameters())
        return final.eval()

    def _finish_stage(self, ctx: StageContext) -> None:
        self._save_checkpoint(ctx, ctx.spec.steps)
        if self.accelerator.is_main_process:
            final = self._final_student(ctx)
            final.save_pretrained(self.stage_dir(ctx.index) / "unet", safe_serialization=True)
        self._validate(ctx, ctx.spec.steps)
        self.accelerator.wait_for_everyone()

    def _save_final_pipeline(self) -> Path:
        last = len(self.recipe.stages) - 1
        out = self.run_dir / "student_pipeline"
        if self.accelerator.is_main_process:
            spec = self.recipe.stages[last]
            components = self._load_components(spec.teacher or self.recipe.student.init_from)
            unet = UNet2DConditionModel.from_pretrained(self.stage_dir(last) / "unet")
            components.with_unet(unet).save_pretrained(out, safe_serialization=True)
        self.accelerator.wait_for_everyone()
        return out

    # ------------------------------------------------------------------ logging and validation

    def _log(self, ctx: StageContext, step: int, its: float) -> None:
        record = {
            "stage": ctx.spec.name,
            "stage_index": ctx.index,
            "step": step,
            "lr": ctx.lr_scheduler.get_last_lr()[0],
            "it_per_s": its,
            "nonfinite_skipped": ctx.nonfinite_skipped,
            "grad_norm": ctx.grad_norm,
            **{f"loss/{name}": value for name, value in ctx.last_terms.items()},
        }
        if ctx.last_terms:
            record["loss/total"] = sum(
                ctx.spec.loss_weights.get(name, 0.0) * value
                for name, value in ctx.last_terms.items()
            )
        global_step = sum(s.steps for s in self.recipe.stages[: ctx.index]) + step
        self.accelerator.log(
            {f"{ctx.spec.name}/{k}": v for k, v in record.items() if isinstance(v, float | int)},
            step=global_step,
        )
        if self.accelerator.is_main_process:
            with self._log_file.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _validate(self, ctx: StageContext, step: int) -> None:
        training = self.recipe.training
        if not training.validation_prompts or not self.accelerator.is_main_process:
            return
        rows = {}
        if ctx.teacher is not None:
            rows[f"teacher {ctx.spec.teacher}"] = ctx.components.with_unet(ctx.teacher.unet)
        rows["student"] = ctx.components.with_unet(self._final_student(ctx))
        path = self.run_dir / "samples" / f"{ctx.index + 1:02d}-{ctx.spec.name}-step{step:07d}.png"
        with self.accelerator.autocast():  # a bf16 teacher beside fp32 VAE and text encoder
            save_validation_grid(
                rows,
                training.validation_prompts,
                path,
                seed=self.recipe.seed,
                num_inference_steps=training.validation_steps,
                guidance_scale=training.validation_guidance,
                device=self.accelerator.device,
            )
