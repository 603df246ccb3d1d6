"""The trainer: a recipe's stages, one after another, on accelerate; the one loop of the project.

One code path for CPU, one GPU, many GPUs and many nodes (`accelerate launch`; DDP or FSDP per
accelerate's config), and for every stage kind: the offline world's VAE and teacher UNet train
through it as the students do. `train()` reads top to bottom:

    plan the run        (distill.plan: teachers resolved and fingerprinted, losses built and
                         shape-checked, before anything is written)
    for each stage from the resume point:
        build the stage (distill.stage: its kind, pipeline, teacher, network, optimizer, EMA)
        for each step:  micro-batches through the kind's loss -> guard -> optimizer -> EMA
                        -> the kind's after_update -> log / checkpoint / snapshot / grid
        finish it       (final checkpoint, the stage's network in diffusers format)
    save the final pipeline (every part the run trained, sampled as the last stage's kind)

Only the main process writes (caches, checkpoints, networks, grids, logs). What changes during a
stage lives in the trainer's `LoopState`; the `Stage` itself is frozen.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs
from diffusers import ModelMixin
from tqdm.auto import tqdm

from core.host_allocator import release_freed_memory
from distill.checkpoint import (
    Checkpoint,
    NonFiniteWeights,
    ResumePlan,
    TrainingState,
    plan_resume,
    save_training_checkpoint,
)
from distill.kinds import ValidationSettings
from distill.optimizer_step import PendingTerms, optimizer_step
from distill.plan import plan_run
from distill.preemption import Preempted, StopRequests
from distill.recipe import Recipe
from distill.run_folder import RunFolder
from distill.run_log import RunLog, tracker_init_kwargs
from distill.saved_weight_casts import step_forward
from distill.stage import Stage, StageBuilder, final_model, training_accelerator
from distill.update import scaler_is_calibrating


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action (checkpoint, grid) runs after `step`; the stage end has its own."""
    return every > 0 and step % every == 0 and step < last


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); the last checkpoint is intact."""


@dataclass
class LoopState:
    """What changes while one stage trains (the trainer's, not the stage's)."""

    step: int  # optimizer steps done in this stage
    nonfinite_skipped: int
    consecutive_nonfinite: int = 0
    terms: dict[str, float] = field(default_factory=dict)  # as of the last log step
    total: float | None = None
    pending: PendingTerms | None = None  # the last applied step's, not yet fetched
    grad_norm: float = math.nan
    data_wait_s: float = 0.0  # time the last optimizer step waited for its data


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
        self.plan = plan_run(recipe)  # every check that needs no weights, before any write
        self.run_dir = Path(recipe.output_dir)
        self.folder = RunFolder(self.run_dir, [s.name for s in recipe.stages], self.plan.components)
        self.resume = resume
        self.progress = progress
        self.stop_after_steps = stop_after_steps
        self.restart_stage = restart_stage
        self._owns_accelerator = accelerator is None
        self.accelerator = accelerator or training_accelerator(recipe.training, self.folder.logs)
        self.stages = StageBuilder(self.plan, self.accelerator, self.folder, progress=progress)
        self.log = RunLog(
            self.accelerator, self.folder.metrics_log, [s.steps for s in recipe.stages]
        )
        self._steps_this_process = 0
        self._stops = StopRequests(recipe.training.stop_signals)  # handlers only inside train()

    @property
    def checkpoint_dir(self) -> Path:
        return self.folder.checkpoints

    def setup(self) -> ResumePlan:
        """Plan where the run starts, check what a resumed stage trains from, create the run
        folder (main process)."""
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
        self.accelerator.init_trackers(
            self.recipe.name,
            init_kwargs=tracker_init_kwargs(
                self.recipe.training.report_to,
                self.folder.logs,
                self.recipe.model_dump(mode="json"),
            ),
        )
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
        stopped early by `stop_after_steps`. Raises `Preempted` after a stop signal
        (`training.stop_signals`), once the checkpoint of the step in flight is written."""
        plan = self.setup()
        with self._stops:
            return self._train_stages(plan)

    def _train_stages(self, plan: ResumePlan) -> Path | None:
        try:
            for index in range(plan.first_stage, len(self.recipe.stages)):
                resume_from = plan.checkpoint if index == plan.first_stage else None
                if not self._run_stage(index, resume_from):
                    return None
                # accelerate keeps a reference to every prepared model and optimizer: without
                # this, the finished stage's AdamW state (4.3 GiB for SD's base student) would
                # still be held while the next stage or the final pipeline loads.
                self.accelerator.free_memory()
                release_freed_memory()  # and hand its pages back (core.host_allocator)
            return self._save_final_pipeline()
        finally:
            self.cleanup()

    def _run_stage(self, index: int, resume_from: Checkpoint | None) -> bool:
        """Build, train and finish stage `index`; False when `stop_after_steps` interrupted it.
        Its optimizer state, EMA and gradients are freed on return, before the next stage (or
        the final pipeline) loads anything."""
        stage = self.stages.build(index, resume_from)
        release_freed_memory()  # what loading freed: the steps allocate other sizes
        try:
            state = self._train_stage(stage)
            if state is None:
                return False
            self._finish_stage(stage, state)
            return True
        finally:
            stage.kind.close()

    def _train_stage(self, stage: Stage) -> LoopState | None:
        """The stage's steps from its start; None when `stop_after_steps` interrupted it."""
        spec, training = stage.plan.spec, self.recipe.training
        state = LoopState(step=stage.start_step, nonfinite_skipped=stage.nonfinite_skipped)
        bar = tqdm(
            total=spec.steps,
            initial=state.step,
            desc=f"stage {stage.index + 1}/{len(self.recipe.stages)} {stage.name}",
            disable=not (self.progress and self.accelerator.is_local_main_process),
            dynamic_ncols=True,
        )
        last_time = time.perf_counter()
        for done in range(stage.start_step + 1, spec.steps + 1):
            self._optimizer_step(stage, state)
            state.step = done
            now = time.perf_counter()
            its, last_time = 1.0 / max(now - last_time, 1e-9), now
            bar.update(1)
            if done % training.log_every == 0 or done == spec.steps:
                self._fetch_terms(state)
                bar.set_postfix(
                    {k: f"{v:.4g}" for k, v in state.terms.items() if "/" not in k}
                    | {"it/s": f"{its:.2f}"}
                )
                self.log.step(
                    stage=stage.name,
                    stage_index=stage.index,
                    step=done,
                    terms=state.terms,
                    total=state.total,
                    lr=stage.lr_scheduler.get_last_lr()[0],
                    it_per_s=its,
                    nonfinite_skipped=state.nonfinite_skipped,
                    grad_norm=state.grad_norm,
                    data_wait_s=state.data_wait_s,
                )
            if done in spec.save_at:
                self._save_snapshot(stage, done)
            if due(done, training.checkpoint_every, spec.steps):
                self._save_checkpoint(stage, state)
            if due(done, training.validate_every, spec.steps):
                self._validate(stage, done)
            if done < spec.steps and self._stop_requested():
                bar.close()
                self._stop_here(stage, state)
            self._steps_this_process += 1
            if self._steps_this_process == self.stop_after_steps:
                bar.close()
                return None
        bar.close()
        return state

    def _optimizer_step(self, stage: Stage, state: LoopState) -> None:
        """One optimizer step (`distill.optimizer_step`), or a skipped one when the loss (on
        some process) or the gradient was not finite. The terms stay on the device
        (`state.pending`) until a log step fetches them."""
        state.data_wait_s = 0.0
        outcome = optimizer_step(
            self.accelerator,
            stage.model,
            stage.optimizer,
            lambda: self._loss_step(stage, state),
            accumulation=stage.plan.spec.gradient_accumulation,
            max_grad_norm=self.recipe.training.max_grad_norm,
            ema=stage.ema,
        )
        state.grad_norm = outcome.grad_norm
        if not outcome.applied:
            calibrating = outcome.loss_finite and scaler_is_calibrating(self.accelerator)
            return self._skip_step(stage, state, counts=not calibrating)
        state.consecutive_nonfinite = 0
        stage.lr_scheduler.step()  # the schedule, the EMA and the kind advance on applied steps
        stage.kind.after_update(stage.model)
        state.pending = outcome.terms

    def _fetch_terms(self, state: LoopState) -> None:
        """The last applied step's terms and total, read from the device at a log step."""
        if state.pending is not None:
            state.terms, state.total = state.pending.fetch(self.accelerator)
            state.pending = None

    def _stop_requested(self) -> bool:
        """Whether a stop signal reached any process: every process must stop at the same step,
        since the checkpoint is written by all of them (FSDP gathers shards)."""
        received = self._stops.requested
        if self.accelerator.num_processes == 1:
            return received
        flag = torch.tensor([float(received)], device=self.accelerator.device)
        return self.accelerator.reduce(flag, reduction="sum").item() > 0

    def _stop_here(self, stage: Stage, state: LoopState) -> None:
        """Checkpoint the step just finished (unless the periodic one just did) and end the run."""
        if not due(state.step, self.recipe.training.checkpoint_every, stage.plan.spec.steps):
            self._save_checkpoint(stage, state)
        self.accelerator.wait_for_everyone()
        received = self._stops.received
        name = received.name if received is not None else "a stop signal on another process"
        raise Preempted(
            f"{name}: stage {stage.name!r} stopped after step {state.step}, its checkpoint is in "
            f"{str(self.checkpoint_dir)!r}; run the same command again to resume"
        )

    def _skip_step(self, stage: Stage, state: LoopState, counts: bool = True) -> None:
        """A step whose loss or gradient was NaN/Inf: nothing changed (weights, optimizer, LR
        schedule, EMA); counted, and after `max_consecutive_nonfinite` in a row, the end."""
        stage.optimizer.zero_grad(set_to_none=True)
        state.nonfinite_skipped += 1
        state.consecutive_nonfinite += int(counts)
        if state.consecutive_nonfinite >= self.recipe.training.max_consecutive_nonfinite:
            raise TrainingStopped(
                f"stage {stage.name!r}: the loss or its gradient was NaN/Inf for "
                f"{state.consecutive_nonfinite} steps in a row at step {state.step + 1}; "
                f"stopped. The last good checkpoint in {str(self.checkpoint_dir)!r} is intact "
                "(lower the learning rate or use bf16 instead of fp16)"
            )

    def _loss_step(
        self, stage: Stage, state: LoopState
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The stage kind's loss of the next micro-batch (read ahead by the loader's workers)."""
        waited = time.perf_counter()
        batch = next(stage.batches)
        state.data_wait_s += time.perf_counter() - waited
        with step_forward(self.accelerator):
            total, terms = stage.kind.loss_step(stage.model, batch)
        return total, {name: term.detach() for name, term in terms.items()}

    def _save_checkpoint(self, stage: Stage, state: LoopState) -> None:
        # Each phase that allocates differently from the steps (saving, sampling, the next
        # stage, the final pipeline) starts from the pages the steps' buffers left free: kept
        # by the CLI's allocator setting, they would otherwise sit beside the new allocations.
        release_freed_memory()
        self.accelerator.wait_for_everyone()
        try:  # every process: an FSDP network is gathered from all of them
            save_training_checkpoint(
                self.checkpoint_dir,
                TrainingState(stage.index, stage.name, state.step, state.nonfinite_skipped),
                accelerator=self.accelerator,
                student=stage.model,
                optimizer=stage.optimizer,
                lr_scheduler=stage.lr_scheduler,
                ema=stage.ema,
                kind_state=stage.kind.state_dict(),
                keep_last=self.recipe.training.keep_last,
            )
        except NonFiniteWeights as error:
            raise TrainingStopped(f"stage {stage.name!r}, step {state.step}: {error}") from None

    def _save_snapshot(self, stage: Stage, step: int) -> None:
        """The stage's network as its end would save it, at a `save_at` step."""
        release_freed_memory()
        snapshot = final_model(stage, self.accelerator)  # every process; the main one gets it
        if snapshot is not None:
            self.folder.save_model(self.folder.snapshot(stage.index, step), snapshot)
        self.accelerator.wait_for_everyone()

    def _finish_stage(self, stage: Stage, state: LoopState) -> None:
        self._save_checkpoint(stage, state)
        final = final_model(stage, self.accelerator)  # every process; the main one gets it
        if final is not None:
            self.folder.save_model(self.folder.stage_output(stage.index), final)
        self._validate(stage, state.step, final)
        self.accelerator.wait_for_everyone()

    def _save_final_pipeline(self) -> Path:
        """The last stage's pipeline with every part the run trained (the student UNet, and
        e.g. a VAE), sampled as the last stage's kind samples."""
        if self.accelerator.is_main_process:
            last = len(self.recipe.stages)
            parts = {
                part: self.stages.load_part(part, folder)
                for part, folder in self.folder.trained_parts(last).items()
            }
            # Loaded afresh: the frozen parts of the training copy were cast to the compute dtype
            # (distill.stage), and the exported pipeline keeps them as the teacher stored them.
            components = self.stages.stage_pipeline(last - 1, fresh=True).with_parts(parts)
            final = self.plan.stages[-1]
            self.folder.save_student_pipeline(
                final.kind.sampling(components.pipeline, final.options)
            )
        self.accelerator.wait_for_everyone()
        return self.folder.student_pipeline

    def _validate(self, stage: Stage, step: int, model: ModelMixin | None = None) -> None:
        """A sample grid, drawn by the main process (the network is gathered by all)."""
        training = self.recipe.training
        if not training.validation_prompts:
            return
        release_freed_memory()
        model = model or final_model(stage, self.accelerator, finish=False)
        if model is not None:
            settings = ValidationSettings(
                prompts=tuple(training.validation_prompts),
                steps=training.validation_steps,
                guidance=training.validation_guidance,
                seed=self.recipe.seed,
            )
            # A bf16 teacher beside fp32 VAE and text encoder. The cast cache on (the steps run
            # without it, distill.saved_weight_casts): every denoising step reuses the casts.
            with self.accelerator.autocast(AutocastKwargs()):
                stage.kind.sample_grid(model, self.folder.sample_grid(stage.index, step), settings)
            self.stages.park_idle_parts(stage.kind)  # what the grid's decode read in
