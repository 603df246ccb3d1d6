"""Time one stage-3 distillation step at Stable Diffusion scale on this machine.

One step is what the trainer does per optimizer step in the reference recipe's stage 3: a frozen
SD v1.4-shaped teacher UNet (random weights, seeded: real weights cost the same FLOPs) and the
`base` student (`layers_per_block=1`, initialized from the teacher) see the same noisy latents;
the engine's own `distill.step.distillation_losses` computes task + output KD + similarity-based
layer matching (weights 1.0, layer pairs = the builder's stage-output pairs); then backward,
gradient clipping to norm 1.0 (the trainer's default) and one AdamW step.

    .venv/bin/python benchmarks/sd_step.py                      # 512 px, batch 1, bf16 autocast
    .venv/bin/python benchmarks/sd_step.py --precision fp32 --json
    .venv/bin/python benchmarks/sd_step.py --tiny --threads 1   # seconds-long smoke run

Precision follows the trainer's mixed precision: the teacher holds bf16 weights, the student keeps
fp32 weights (and fp32 AdamW state) and runs under `torch.autocast("cpu", bfloat16)`.

The split is measured with forward hooks on the two models (teacher forward, student forward)
and clocks around backward and the optimizer; "losses" is the rest of the loss computation
(similarity matrices, MSEs). On 2 shared cores a competing process makes OpenMP threads
spin-wait and multi-thread kernels many times slower, so the load average is printed next to the
figures: trust them only when it was low.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn

from core.families import builtin_config, unet_from_config
from distill.losses import Loss, build_losses, validate_loss_blocks
from distill.step import NoisyBatch, distillation_losses, noise_batch
from distill.teacher import FrozenTeacher
from offline.tiny_models import sd_v1_4_toy_config, training_noise_scheduler
from students import build_student, count_params, forward_gflops

TEACHER = "sd-v1-4"
VARIANT = "base"
# The reference recipe's stage 3 (recipes/small_sd_v0.yaml): 64×64 maps pooled to 16×16.
STAGE3_LOSSES = {
    "task": {"weight": 1.0},
    "output_kd": {"weight": 1.0},
    "similarity": {"weight": 1.0, "max_positions": 256},
}
MAX_GRAD_NORM = 1.0  # the trainer's default `training.max_grad_norm`
LEARNING_RATE = 1e-5  # the reference recipe's; it does not change the cost
VAE_SCALE = 8  # SD's VAE: 512 px images → 64×64 latents
TEXT_LENGTH = 77  # CLIP's context length

TINY_RESOLUTION = 64  # 8×8 latents: 8 → 4 → 2 → 1 through the four stages

GIB = 1024**3


class ForwardClock:
    """Seconds spent in a module's forward calls, from a pre-hook and a post-hook.

    A managed object (hooks removed on exit), so it can sit around the engine's own
    `distillation_losses` call and split its time without copying that code. CPU kernels run
    synchronously, so wall-clock time between the hooks is the forward's time.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.seconds = 0.0
        self._started: float | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> ForwardClock:
        self._handles = [
            self.module.register_forward_pre_hook(self._start),
            self.module.register_forward_hook(self._stop),
        ]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _start(self, module: nn.Module, args: Any) -> None:
        self._started = time.perf_counter()

    def _stop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time one stage-3 distillation step (SD v1.4 teacher → base student) on CPU."
    )
    parser.add_argument("--resolution", type=int, default=None, help="image side in px (512)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--unfused-adamw",
        action="store_true",
        help="the per-tensor AdamW loop instead of the trainer's fused AdamW (for comparison)",
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps after 1 warm-up step")
    parser.add_argument("--threads", type=int, default=None, help="default: os.cpu_count()")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--tiny", action="store_true", help=f"toy-width UNets at {TINY_RESOLUTION} px (smoke run)"
    )
    args = parser.parse_args(argv)
    if args.resolution is None:
        args.resolution = TINY_RESOLUTION if args.tiny else 512
    for name in ("resolution", "batch_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    # Each of the 3 downsamplers halves the latent, so it must be a multiple of 8 (= 64 px).
    multiple = VAE_SCALE * 2 ** (len(teacher_config(args.tiny)["block_out_channels"]) - 1)
    if args.resolution % multiple:
        parser.error(f"--resolution must be a multiple of {multiple}, got {args.resolution}")
    return args


def teacher_config(tiny: bool) -> dict[str, Any]:
    """SD v1.4's UNet config; with `tiny`, the same layout at toy widths (a seconds-long smoke run,
    so the benchmark is smoke-tested and cannot rot)."""
    return sd_v1_4_toy_config() if tiny else builtin_config(TEACHER)


def build_models(
    config: dict[str, Any], precision: str, seed: int
) -> tuple[FrozenTeacher, UNet2DConditionModel]:
    """(frozen teacher, fp32 student initialized from it), seeded.

    The student is built from the fp32 teacher so that it gets fp32 weights, as in the trainer;
    only then is the teacher cast to its run dtype.
    """
    torch.manual_seed(seed)
    unet = unet_from_config(config, device="cpu")
    student, _ = build_student(unet, VARIANT)
    teacher_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return FrozenTeacher(unet, dtype=teacher_dtype), student


def random_batch(
    scheduler: DDPMScheduler,
    batch_size: int,
    latent_size: int,
    text_dim: int,
    generator: torch.Generator,
    first_sample: int,
) -> NoisyBatch:
    """Random cached posteriors and text embeddings, noised by the trainer's `noise_batch` with
    one generator per sample (seeded by its place in the benchmark's sample stream)."""
    shape = (batch_size, 4, latent_size, latent_size)
    mean = torch.randn(shape, generator=generator)  # (B, 4, h, w)
    std = torch.rand(shape, generator=generator) * 0.1
    text = torch.randn(batch_size, TEXT_LENGTH, text_dim, generator=generator)  # (B, 77, D)
    generators = [torch.Generator().manual_seed(first_sample + i) for i in range(batch_size)]
    return noise_batch(
        mean,
        std,
        {"encoder_hidden_states": text},
        {"encoder_hidden_states": torch.zeros(TEXT_LENGTH, text_dim)},
        generators,
        scheduler=scheduler,
        scaling_factor=1.0,  # the random mean already has unit scale
        uncond_prob=0.1,
    )


def timed_step(
    student: UNet2DConditionModel,
    teacher: FrozenTeacher,
    batch: NoisyBatch,
    losses: Sequence[Loss],
    optimizer: torch.optim.Optimizer,
    precision: str,
) -> dict[str, Any]:
    """One optimizer step; seconds per phase (they add up to "step") and the raw loss terms."""
    start = time.perf_counter()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with ForwardClock(teacher) as teacher_clock, ForwardClock(student) as student_clock, autocast:
        total, terms = distillation_losses(student, teacher, batch, losses)
    after_losses = time.perf_counter()
    total.backward()
    after_backward = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(student.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    total, terms = total.detach(), {name: term.detach() for name, term in terms.items()}
    loss_seconds = after_losses - start
    return {
        "seconds": {
            "step": end - start,
            "teacher_forward": teacher_clock.seconds,
            "student_forward": student_clock.seconds,
            "losses": loss_seconds - teacher_clock.seconds - student_clock.seconds,
            "backward": after_backward - after_losses,
            "optimizer": end - after_backward,
        },
        # Each loss's term and the total; per-pair terms ("similarity/<layer>") apart.
        "loss_terms": {k: v.item() for k, v in terms.items() if "/" not in k}
        | {"total": total.item()},
        "pair_terms": {k: v.item() for k, v in terms.items() if "/" in k},
    }


def step_gflop(
    teacher: UNet2DConditionModel,
    student: UNet2DConditionModel,
    latent_size: int,
    batch_size: int,
) -> dict[str, float]:
    """Model FLOPs of one step, counted on meta-device copies at this latent size.

    teacher forward + student forward + student backward (≈ 2× its forward: gradients with respect
    to activations and to weights), as in docs/design.md's estimate. Gradient checkpointing adds one
    more student forward, which this figure leaves out: it is the useful work.
    """

    def meta_gflops(model: UNet2DConditionModel) -> float:
        config = {**dict(model.config), "sample_size": latent_size}
        return forward_gflops(unet_from_config(config, device="meta"), batch_size)

    teacher_forward, student_forward = meta_gflops(teacher), meta_gflops(student)
    return {
        "teacher_forward": teacher_forward,
        "student_forward": student_forward,
        "step": teacher_forward + 3 * student_forward,
    }


def machine_facts(threads: int) -> dict[str, Any]:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # oneDNN's own check: whether bf16 convolutions/matmuls have native kernels here.
        "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "cpu_bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}),
        "load_average": list(os.getloadavg()),
    }


def peak_rss_gib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def current_rss_gib() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / GIB


def run(args: argparse.Namespace) -> dict[str, Any]:
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    load_before = machine_facts(threads)

    setup_start = time.perf_counter()
    config = teacher_config(args.tiny)
    teacher, student = build_models(config, args.precision, args.seed)
    student.train()
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    # The trainer's optimizer is torch.optim.AdamW with its defaults (the per-tensor loop on CPU).
    fused = {} if args.unfused_adamw else {"fused": True}  # the trainer uses fused
    optimizer = torch.optim.AdamW(student.parameters(), lr=LEARNING_RATE, **fused)
    losses = build_losses(validate_loss_blocks(STAGE3_LOSSES), student.config, teacher.config)
    layer_pairs = next(loss.layer_pairs for loss in losses if loss.name == "similarity")
    scheduler = training_noise_scheduler()
    latent_size = args.resolution // VAE_SCALE
    generator = torch.Generator().manual_seed(args.seed)
    setup_seconds = time.perf_counter() - setup_start
    rss_after_setup = current_rss_gib()
    peak_after_setup = peak_rss_gib()

    steps = []
    for step in range(1 + args.steps):  # the first is the warm-up: it also allocates AdamW's state
        batch = random_batch(
            scheduler,
            args.batch_size,
            latent_size,
            config["cross_attention_dim"],
            generator,
            first_sample=step * args.batch_size,
        )
        steps.append(timed_step(student, teacher, batch, losses, optimizer, args.precision))
    warmup, timed = steps[0], steps[1:]

    gflop = step_gflop(teacher.unet, student, latent_size, args.batch_size)
    median_step = statistics.median(s["seconds"]["step"] for s in timed)
    return {
        "benchmark": "stage-3 distillation step",
        "teacher": f"{TEACHER} (tiny widths)" if args.tiny else TEACHER,
        "student_variant": VARIANT,
        "losses": {name: block["weight"] for name, block in STAGE3_LOSSES.items()},
        "layer_pairs": [list(pair) for pair in layer_pairs],
        "resolution": args.resolution,
        "latent_size": latent_size,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "fused_adamw": not args.unfused_adamw,
        "params": {"teacher": count_params(teacher), "student": count_params(student)},
        "setup_seconds": setup_seconds,
        "warmup_seconds": warmup["seconds"]["step"],
        "timed_steps": args.steps,
        "step_seconds": {
            "median": median_step,
            "min": min(s["seconds"]["step"] for s in timed),
            "all": [s["seconds"]["step"] for s in timed],
        },
        # Per phase, the median over the timed steps.
        "phase_seconds": {
            phase: statistics.median(s["seconds"][phase] for s in timed)
            for phase in timed[0]["seconds"]
            if phase != "step"
        },
        "gflop": gflop,
        "gflop_per_second": gflop["step"] / median_step,
        "loss_terms": timed[-1]["loss_terms"],
        "pair_terms": timed[-1]["pair_terms"],
        "memory_gib": {
            "peak_rss": peak_rss_gib(),
            "peak_rss_after_setup": peak_after_setup,
            "rss_after_setup": rss_after_setup,
            "rss_end": current_rss_gib(),
        },
        "machine": load_before,
        "load_average_end": list(os.getloadavg()),
    }


def format_report(result: dict[str, Any]) -> str:
    machine, memory, phases = result["machine"], result["memory_gib"], result["phase_seconds"]
    step = result["step_seconds"]
    student_weights = "fp32 weights, bf16 autocast" if result["precision"] == "bf16" else "fp32"
    teacher_dtype = "bf16" if result["precision"] == "bf16" else "fp32"
    bf16 = ", ".join(machine["cpu_bf16_flags"]) or "no native bf16 flags"
    lines = [
        f"one {result['benchmark']}: {' + '.join(result['losses'])} (weights 1.0), "
        f"{len(result['layer_pairs'])} layer pairs, "
        f"{'fused ' if result['fused_adamw'] else ''}AdamW",
        f"  teacher  {result['teacher']}: {result['params']['teacher']:,} params "
        f"({teacher_dtype}, frozen)",
        f"  student  {result['student_variant']}: {result['params']['student']:,} params "
        f"({student_weights}"
        f"{', gradient checkpointing' if result['gradient_checkpointing'] else ''})",
        f"  batch {result['batch_size']} × {result['resolution']} px "
        f"({result['latent_size']}×{result['latent_size']} latents)",
        f"  machine  torch {machine['torch']}, threads {machine['threads']} of "
        f"{machine['cpu_count']} CPUs, {machine['cpu_capability']}, bf16: {bf16} "
        f"(oneDNN bf16 {'yes' if machine['onednn_bf16'] else 'no'})",
        "  load average (1/5/15 min): "
        f"start {' '.join(f'{x:.2f}' for x in machine['load_average'])}, "
        f"end {' '.join(f'{x:.2f}' for x in result['load_average_end'])}",
        f"setup {result['setup_seconds']:.1f} s, warm-up step {result['warmup_seconds']:.2f} s",
        f"seconds per step over {result['timed_steps']}: median {step['median']:.2f}, "
        f"min {step['min']:.2f}",
    ]
    lines += [f"  {phase:<16} {seconds:8.2f}" for phase, seconds in phases.items()]
    gflop = result["gflop"]
    lines += [
        f"model compute: {gflop['step']:,.4g} GFLOP per step (teacher forward "
        f"{gflop['teacher_forward']:,.4g} + 3 × student forward {gflop['student_forward']:,.4g})"
        f", {result['gflop_per_second']:,.4g} GFLOP/s",
        f"peak RSS {memory['peak_rss']:.2f} GiB (after setup {memory['peak_rss_after_setup']:.2f})",
    ]
    if memory["rss_end"] is not None:
        lines.append(
            f"RSS (psutil): after setup {memory['rss_after_setup']:.2f} GiB, "
            f"at the end {memory['rss_end']:.2f} GiB"
        )
    terms = ", ".join(f"{name} {value:.4g}" for name, value in result["loss_terms"].items())
    lines.append(f"last step's loss terms: {terms}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result) if args.json else format_report(result))
    return result


if __name__ == "__main__":
    main()
