"""The distillation trainer: a recipe's stages, one after another, on accelerate.

One code path for CPU, one GPU, many GPUs and many nodes (`accelerate launch`; DDP, FSDP or
DeepSpeed per accelerate's config). `train()` reads top to bottom:

    check every stage's losses on meta-device models (before anything is written)
    for each stage from the resume point:
        build the stage   (distill.stage: teacher, cache, student, optimizer, EMA, losses)
        for each step:    loss step (micro-batches) -> clip -> optimizer -> EMA -> log/ckpt/grid
        finish the stage  (final checkpoint, the stage's student in diffusers format)
    save the final student pipeline

Only the main process writes (caches, checkpoints, students, grids, logs).
"""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from tqdm.auto import tqdm

from distill.checkpoint import (
    NonFiniteWeights,
    ResumePlan,
    TrainingState,
    plan_resume,
    save_training_checkpoint,
)
from distill.precision import at_least_fp32
from distill.preflight import check_recipe_losses
from distill.recipe import Recipe
from distill.run_folder import RunFolder
from distill.run_log import RunLog
from distill.stage import (
    StageBuilder,
    StageContext,
    final_student,
    save_stage_grid,
    training_accelerator,
)
from distill.step import distillation_losses, noise_batch
from distill.step_randomness import sample_generator
from distill.taps import unwrap_model
from distill.update import guarded_update, scaler_is_calibrating


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action (checkpoint, grid) runs after `step`; the stage end has its own."""
    return every > 0 and step % every == 0 and step < last


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); the last checkpoint is intact."""


class DistillationTrainer:
    def __init__(
        self,
        recipe: Recipe,
        *,
        accelerator: Accelerator | None = None,
        resume: bool | None = None,
        progress: bool = True,
        stop_after_steps: int | None = None,
        restart_stage: bool = False,
    ) -> None:
        """`resume`: True = must resume, False = start fresh, None = resume if a checkpoint exists.
        `restart_stage`: train the stage of the latest checkpoint again from its start.

        `stop_after_steps` ends `train()` after that many optimizer steps in this process, as an
        interruption would (used to test resumption).
        """
        self.recipe = recipe
        self.run_dir = Path(recipe.output_dir)
        self.folder = RunFolder(self.run_dir, [stage.name for stage in recipe.stages])
        self.resume = resume
        self.progress = progress
        self.stop_after_steps = stop_after_steps
        self.restart_stage = restart_stage
        self._owns_accelerator = accelerator is None
        self.accelerator = accelerator or training_accelerator(recipe.training, self.folder.logs)
        self.stages = StageBuilder(recipe, self.accelerator, self.folder, progress=progress)
        self.log = RunLog(
            self.accelerator, self.folder.metrics_log, [s.steps for s in recipe.stages]
        )
        self._steps_this_process = 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.folder.checkpoints

    def setup(self) -> ResumePlan:
        """Check the losses and what a resumed stage trains from, create the run folder (main
        process), and plan where the run starts."""
        check_recipe_losses(self.recipe)
        plan = plan_resume(
            self.checkpoint_dir,
            [stage.steps for stage in self.recipe.stages],
            saved=self.folder.stage_finished,
            resume=self.resume,
            restart_stage=self.restart_stage,
        )
        if plan.checkpoint is not None:
            self.stages.check_unchanged_teacher(plan.first_stage)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            for stale in plan.discarded:
                shutil.rmtree(stale.path, ignore_errors=True)
            self.folder.write_recipe(self.recipe)
            step = plan.checkpoint.state.step if plan.checkpoint else 0
            self.log.rewind(plan.first_stage, step)  # steps after the checkpoint run again
        self.accelerator.init_trackers(self.recipe.name)
        self.accelerator.wait_for_everyone()
        return plan

    def cleanup(self) -> None:
        """End the trackers; also the process group when this trainer made the accelerator (a
        caller's accelerator stays usable, e.g. for the next run)."""
        if self._owns_accelerator:
            self.accelerator.end_training()
        else:
            for tracker in self.accelerator.trackers:
                tracker.finish()

    def train(self) -> Path | None:
        """Run every stage from the resume point; returns the final pipeline folder, or None when
        stopped early by `stop_after_steps`."""
        plan = self.setup()
        try:
            for index in range(plan.first_stage, len(self.recipe.stages)):
                resume_from = plan.checkpoint if index == plan.first_stage else None
                context = self.stages.build(index, resume_from)
                if not self._train_stage(context):
                    return None
                self._finish_stage(context)
            return self._save_final_pipeline()
        finally:
            self.cleanup()

    def _train_stage(self, ctx: StageContext) -> bool:
        """The stage's steps from its start; False when `stop_after_steps` interrupted it."""
        spec, training = ctx.spec, self.recipe.training
        bar = tqdm(
            total=spec.steps,
            initial=ctx.start_step,
            desc=f"stage {ctx.index + 1}/{len(self.recipe.stages)} {spec.name}",
            disable=not (self.progress and self.accelerator.is_local_main_process),
            dynamic_ncols=True,
        )
        last_time = time.perf_counter()
        for done in range(ctx.start_step + 1, spec.steps + 1):
            self._optimizer_step(ctx, done - 1)
            now = time.perf_counter()
            its, last_time = 1.0 / max(now - last_time, 1e-9), now
            bar.update(1)
            bar.set_postfix(
                {k: f"{v:.4g}" for k, v in ctx.last_terms.items() if "/" not in k}
                | {"it/s": f"{its:.2f}"}
            )
            if done % training.log_every == 0 or done == spec.steps:
                self.log.step(
                    stage=spec.name,
                    stage_index=ctx.index,
                    step=done,
                    terms=ctx.last_terms,
                    total=ctx.last_total,
                    lr=ctx.lr_scheduler.get_last_lr()[0],
                    it_per_s=its,
                    nonfinite_skipped=ctx.nonfinite_skipped,
                    grad_norm=ctx.grad_norm,
                    data_wait_s=ctx.data_wait_s,
                )
            if due(done, training.checkpoint_every, spec.steps):
                self._save_checkpoint(ctx, done)
            if due(done, training.validate_every, spec.steps):
                self._validate(ctx, done)
            self._steps_this_process += 1
            if self._steps_this_process == self.stop_after_steps:
                bar.close()
                return False
        bar.close()
        return True

    def _optimizer_step(self, ctx: StageContext, step: int) -> None:
        """One optimizer step over `gradient_accumulation` micro-batches. Sets the context's last
        terms and total (means over micro-batches and processes), or skips the step when the
        loss (on some process) or the gradient was not finite."""
        accelerator, accumulation = self.accelerator, ctx.spec.gradient_accumulation
        ctx.student.train()
        sums: dict[str, torch.Tensor] = {}
        total_sum = torch.zeros((), device=accelerator.device)
        ctx.data_wait_s = 0.0
        for micro in range(accumulation):
            with ExitStack() as stack:
                if micro < accumulation - 1:
                    stack.enter_context(accelerator.no_sync(ctx.student))
                total, terms = self._loss_step(ctx)
                # Every process must agree before backward, or DDP's all-reduce would hang.
                finite = torch.tensor(
                    [float(torch.isfinite(total).item())], device=accelerator.device
                )
                if accelerator.reduce(finite, reduction="sum").item() < accelerator.num_processes:
                    for _ in range(accumulation - micro - 1):  # keep the stream on step
                        next(ctx.batches)
                    return self._skip_step(ctx, step)
                accelerator.backward(total / accumulation)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + at_least_fp32(value) / accumulation
            total_sum = total_sum + at_least_fp32(total.detach()) / accumulation
        applied, ctx.grad_norm = guarded_update(
            accelerator, ctx.student, ctx.optimizer, self.recipe.training.max_grad_norm
        )
        if not applied:
            return self._skip_step(ctx, step, counts=not scaler_is_calibrating(accelerator))
        ctx.consecutive_nonfinite = 0
        ctx.lr_scheduler.step()  # the schedule and the EMA advance on applied steps only
        if ctx.ema is not None:
            ctx.ema.step(unwrap_model(ctx.student).parameters())
        # Logged values are means over processes, i.e. over the whole global batch.
        names = list(sums)
        stacked = torch.stack([sums[name] for name in names] + [total_sum])
        means = accelerator.reduce(stacked, reduction="mean").tolist()
        ctx.last_terms, ctx.last_total = dict(zip(names, means[:-1], strict=True)), means[-1]

    def _skip_step(self, ctx: StageContext, step: int, counts: bool = True) -> None:
        """A step whose loss or gradient was NaN/Inf: nothing changed (weights, optimizer, LR
        schedule, EMA); counted, and after `max_consecutive_nonfinite` in a row, the end."""
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.nonfinite_skipped += 1
        ctx.consecutive_nonfinite += int(counts)
        if ctx.consecutive_nonfinite >= self.recipe.training.max_consecutive_nonfinite:
            raise TrainingStopped(
                f"stage {ctx.spec.name!r}: the loss or its gradient was NaN/Inf for "
                f"{ctx.consecutive_nonfinite} steps in a row at step {step + 1}; stopped. The "
                f"last good checkpoint in {str(self.checkpoint_dir)!r} is intact (lower the "
                "learning rate or use bf16 instead of fp16)"
            )

    def _loss_step(self, ctx: StageContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of the next micro-batch: this process's samples, noised, through both models."""
        waited = time.perf_counter()
        loaded = next(ctx.batches)  # read ahead by the loader's workers
        ctx.data_wait_s += time.perf_counter() - waited
        batch = noise_batch(
            loaded["latent_mean"],
            loaded["latent_std"],
            loaded["conditioning"],
            ctx.cache.empty_conditioning,
            [sample_generator(self.recipe.seed, ctx.index, int(p)) for p in loaded["positions"]],
            scheduler=ctx.noise_scheduler,
            scaling_factor=ctx.cache.scaling_factor,
            shift_factor=ctx.cache.shift_factor,
            uncond_prob=self.recipe.training.uncond_prob,
            device=self.accelerator.device,
            dtype=self.stages.precision.weights,
        )
        batch = replace(batch, conditioning=ctx.conditioning.encode(batch.conditioning))
        with self.accelerator.autocast():
            total, terms = distillation_losses(ctx.student, ctx.teacher, batch, ctx.losses)
        return total, {name: term.detach() for name, term in terms.items()}

    def _save_checkpoint(self, ctx: StageContext, step: int) -> None:
        self.accelerator.wait_for_everyone()
        try:  # every process: an FSDP student is gathered from all of them
            save_training_checkpoint(
                self.checkpoint_dir,
                TrainingState(ctx.index, ctx.spec.name, step, ctx.nonfinite_skipped),
                accelerator=self.accelerator,
                student=ctx.student,
                optimizer=ctx.optimizer,
                lr_scheduler=ctx.lr_scheduler,
                ema=ctx.ema,
                keep_last=self.recipe.training.keep_last,
            )
        except NonFiniteWeights as error:
            raise TrainingStopped(f"stage {ctx.spec.name!r}, step {step}: {error}") from None

    def _finish_stage(self, ctx: StageContext) -> None:
        self._save_checkpoint(ctx, ctx.spec.steps)
        final = final_student(ctx, self.accelerator)  # every process; the main one gets it
        if final is not None:
            self.folder.save_stage_student(ctx.index, final)
        self._validate(ctx, ctx.spec.steps, final)
        self.accelerator.wait_for_everyone()

    def _save_final_pipeline(self) -> Path:
        if self.accelerator.is_main_process:
            source = self.stages.source_key(len(self.recipe.stages) - 1)
            self.folder.save_student_pipeline(
                self.stages.components(source),
                len(self.recipe.stages) - 1,
                self.stages.precision.weights,
            )
        self.accelerator.wait_for_everyone()
        return self.folder.student_pipeline

    def _validate(
        self, ctx: StageContext, step: int, student: UNet2DConditionModel | None = None
    ) -> None:
        """A sample grid (the main process draws it; the student is gathered by all)."""
        if not self.recipe.training.validation_prompts:
            return
        student = student or final_student(ctx, self.accelerator)
        if student is not None:
            path = self.folder.sample_grid(ctx.index, step)
            save_stage_grid(
                ctx, student, self.accelerator, self.recipe.training, self.recipe.seed, path
            )
