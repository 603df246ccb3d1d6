"""Time one distillation step at Stable Diffusion scale: the trainer's own step code.

One step is what the trainer does per optimizer step (`distill.optimizer_step.optimizer_step`,
the function its loop calls): a frozen SD v1.4-shaped teacher UNet (random weights, seeded: real
weights cost the same FLOPs) and the `base` student (`layers_per_block=1`, initialized from the
teacher) see the same noisy latents; the engine's `distill.step.distillation_losses` computes
the chosen losses through taps registered once (`StepTaps`); then backward, the guarded update
(gradient clipping to norm 1.0, the trainer's fused AdamW from `distill.stage.make_optimizer`)
and the EMA (`distill.ema.StudentEMA`, on unless `--no-ema`), all through accelerate with the
trainer's mixed precision.

    .venv/bin/python benchmarks/sd_step.py                      # 512 px, batch 1, bf16, stage 3
    .venv/bin/python benchmarks/sd_step.py --losses bk-sdm --gradient-checkpointing
    .venv/bin/python benchmarks/sd_step.py --losses bk-sdm --gradient-checkpointing selective
    .venv/bin/python benchmarks/sd_step.py --losses bk-sdm --profile 15   # the costliest ops
    .venv/bin/python benchmarks/sd_step.py --device cuda --batch-size 32 --compile --losses bk-sdm
    .venv/bin/python benchmarks/sd_step.py --tiny --threads 1   # seconds-long smoke run

Losses: `bk-sdm` task + output KD + feature KD (BK-SDM's single stage), `stage2` task + output
KD, `stage3` task + output KD + similarity-based layer matching (the reference recipe's third
stage), all weights 1.0 over the builder's stage-output layer pairs.

It prints seconds per step (warm-up steps first: with `--compile` the compile happens there), images
per second, the model TFLOP per step and the rate reached, that rate as a fraction of the bf16
matmul peak measured in the same run (a large bf16 matmul), peak memory (RSS on a CPU, peak
allocated on a GPU) and its split into student weights, gradients, optimizer state, EMA,
teacher and the rest (activations, temporaries, the libraries), and the phase split (teacher
forward, student forward, losses, backward, optimizer, EMA; on a GPU each mark synchronises).
On 2 shared cores a competing process slows every kernel many times: the load average is printed
next to the figures. As `distill run` does, the process keeps freed memory for reuse
(`core.host_allocator`; `--system-malloc` for glibc's defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn

from core.cpu_attention import use_kernel_attention
from core.families import builtin_config, unet_from_config
from core.host_allocator import keep_freed_memory
from distill.activation_checkpointing import enable_checkpointing
from distill.compilation import compile_regions, dynamo_counters
from distill.ema import DiskEMA, StudentEMA
from distill.losses import build_losses, validate_loss_blocks
from distill.optimizer_step import optimizer_step
from distill.recipe import EMASpec, TrainingSpec
from distill.saved_weight_casts import step_autocast_kwargs, step_forward
from distill.stage import make_ema, make_optimizer
from distill.step import NoisyBatch, StepTaps, distillation_losses, noise_batch
from distill.teacher import FrozenTeacher
from offline.tiny_models import sd_v1_4_toy_config, training_noise_scheduler
from students import build_student, count_params, forward_gflops

TEACHER = "sd-v1-4"
VARIANT = "base"
LOSS_SETS = {
    # BK-SDM's single stage: task + output KD + feature KD over every stage's output.
    "bk-sdm": {"task": {"weight": 1.0}, "output_kd": {"weight": 1.0}, "feature_kd": {}},
    # The reference recipe's stage 2 (soft labels) and stage 3 (recipes/small_sd_v0.yaml: 64×64
    # maps pooled to 16×16 for the similarity matrices).
    "stage2": {"task": {"weight": 1.0}, "output_kd": {"weight": 1.0}},
    "stage3": {
        "task": {"weight": 1.0},
        "output_kd": {"weight": 1.0},
        "similarity": {"weight": 1.0, "max_positions": 256},
    },
}
CHECKPOINTING_SETTINGS = {None: False, "full": True, "selective": "selective"}
MAX_GRAD_NORM = 1.0  # the trainer's default `training.max_grad_norm`
LEARNING_RATE = 1e-5  # the reference recipe's; it does not change the cost
EMA_DECAY = 0.9999
VAE_SCALE = 8  # SD's VAE: 512 px images → 64×64 latents
TEXT_LENGTH = 77  # CLIP's context length

TINY_RESOLUTION = 64  # 8×8 latents: 8 → 4 → 2 → 1 through the four stages

GIB = 1024**3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForwardClock:
    """Seconds spent in a module's forward calls, from a pre-hook and a post-hook.

    A managed object (hooks removed on exit), so it can sit around the engine's own
    `distillation_losses` call and split its time without copying that code. On a GPU each hook
    synchronises, so the clock measures the kernels, not their launch.
    """

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.module = module
        self.device = device
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
        synchronize(self.device)
        self._started = time.perf_counter()

    def _stop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._started is not None:
            synchronize(self.device)
            self.seconds += time.perf_counter() - self._started
            self._started = None


class PhaseMarks:
    """`distill.optimizer_step.PhaseClock`: the time at which each phase of a step ended."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = time.perf_counter()
        self.ends: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        synchronize(self.device)
        self.ends[phase] = time.perf_counter()

    def seconds(self) -> dict[str, float]:
        """Each phase's duration, in step order (a phase that did not run is 0)."""
        durations, last = {}, self.start
        for phase in ("forward", "backward", "optimizer", "ema"):
            end = self.ends.get(phase, last)
            durations[phase], last = end - last, end
        return durations


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time one distillation step (SD v1.4 teacher → base student)."
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--losses", choices=sorted(LOSS_SETS), default="stage3")
    parser.add_argument("--resolution", type=int, default=None, help="image side in px (512)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument(
        "--gradient-checkpointing",
        nargs="?",
        const="full",
        choices=("full", "selective"),
        help="the student's activation checkpointing (training.gradient_checkpointing: full is "
        "true); default: none",
    )
    parser.add_argument(
        "--compile", action="store_true", help="regional torch.compile of both UNets"
    )
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile's backend")
    parser.add_argument("--no-ema", action="store_true", help="leave the EMA out of the step")
    parser.add_argument(
        "--ema-storage",
        choices=("auto", "memory", "disk"),
        default="auto",
        help="where the EMA lives (training.ema.storage; auto: the trainer's choice)",
    )
    parser.add_argument(
        "--ema-every", type=int, default=None, help="EMA update interval (default: the trainer's)"
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="both UNets in channels-last memory format"
    )
    parser.add_argument(
        "--torch-attention",
        action="store_true",
        help="PyTorch's attention kernels instead of the trainer's CPU kernel (core.cpu_attention)",
    )
    parser.add_argument(
        "--unfused-adamw",
        action="store_true",
        help="the per-tensor AdamW loop instead of the trainer's fused AdamW (for comparison)",
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="default: 1, or 3 with --compile"
    )
    parser.add_argument("--threads", type=int, default=None, help="default: os.cpu_count()")
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="glibc's malloc defaults instead of the CLI's (core.host_allocator), to compare",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="run the last timed step under torch.profiler and print its N costliest ops",
    )
    parser.add_argument(
        "--tiny", action="store_true", help=f"toy-width UNets at {TINY_RESOLUTION} px (smoke run)"
    )
    args = parser.parse_args(argv)
    if args.resolution is None:
        args.resolution = TINY_RESOLUTION if args.tiny else 512
    if args.warmup_steps is None:
        args.warmup_steps = 3 if args.compile else 1
    for name in ("resolution", "batch_size", "steps", "warmup_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
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
    """(frozen teacher, fp32 student initialized from it), seeded, on the CPU.

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
    device: torch.device,
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
        device=device,
    )


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


def bf16_matmul_peak(device: torch.device, size: int, repeats: int = 3) -> float:
    """GFLOP/s of a (size × size) @ (size × size) bf16 matmul, the best of `repeats`: the
    device's practical dense bf16 peak, measured beside the step in the same process."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    torch.mm(a, b)  # warm-up (kernel selection, first-touch)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def tensor_gib(tensors: Sequence[torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / GIB


def machine_facts(threads: int, device: torch.device) -> dict[str, Any]:
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
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
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


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return peak_rss_gib()


def run(args: argparse.Namespace) -> dict[str, Any]:
    # As `distill run` does (cli.main), before the first large allocation.
    kept_freed_memory = False if args.system_malloc else keep_freed_memory()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    facts = machine_facts(threads, device)
    if device.type == "cuda":  # TF32 for whatever runs in fp32 (the trainer sets the same)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    baseline_memory = peak_memory_gib(device)  # the libraries, before any model exists

    setup_start = time.perf_counter()
    AcceleratorState._reset_state(True)
    mixed = "bf16" if args.precision == "bf16" else "no"
    accelerator = Accelerator(
        mixed_precision=mixed, cpu=device.type == "cpu", kwargs_handlers=[step_autocast_kwargs()]
    )
    config = teacher_config(args.tiny)
    teacher, student = build_models(config, args.precision, args.seed)
    teacher = teacher.to(device)
    if args.channels_last:
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
    enable_checkpointing(student, CHECKPOINTING_SETTINGS[args.gradient_checkpointing])
    kernel_attention = 0
    if not args.torch_attention:  # as the trainer does (distill.stage)
        compute = torch.bfloat16 if args.precision == "bf16" else torch.float32
        kernel_attention = use_kernel_attention(student, device, compute)
        kernel_attention += use_kernel_attention(teacher.unet, device, compute)
    if args.unfused_adamw:
        optimizer = torch.optim.AdamW(student.parameters(), lr=LEARNING_RATE)
    else:
        optimizer = make_optimizer(student, LEARNING_RATE, TrainingSpec(mixed_precision=mixed))
    model, optimizer = accelerator.prepare(student, optimizer)
    ema_spec = EMASpec(
        enabled=not args.no_ema, decay=EMA_DECAY, storage=args.ema_storage, every=args.ema_every
    )
    ema_file = Path(tempfile.mkdtemp(prefix="sd_step_ema_")) / "ema.safetensors"
    ema = make_ema(model, ema_spec, UNet2DConditionModel, device, file=ema_file)
    compiled = 0
    if args.compile:
        backend = args.compile_backend
        compiled = compile_regions(model, backend=backend)
        compiled += compile_regions(teacher.unet, backend=backend)
    losses = [
        loss.to(device)
        for loss in build_losses(
            validate_loss_blocks(LOSS_SETS[args.losses]), student.config, teacher.config
        )
    ]
    layer_pairs = next((loss.layer_pairs for loss in losses if hasattr(loss, "layer_pairs")), [])
    scheduler = training_noise_scheduler()
    latent_size = args.resolution // VAE_SCALE
    generator = torch.Generator().manual_seed(args.seed)
    setup_seconds = time.perf_counter() - setup_start
    peak_after_setup = peak_memory_gib(device)

    steps = []
    with StepTaps(model, teacher, losses) as taps:
        for step in range(args.warmup_steps + args.steps):
            if step == args.warmup_steps:
                counters_after_warmup = dynamo_counters()
            batch = random_batch(
                scheduler,
                args.batch_size,
                latent_size,
                config["cross_attention_dim"],
                generator,
                first_sample=step * args.batch_size,
                device=device,
            )
            last = step == args.warmup_steps + args.steps - 1
            with op_profile(enabled=last and args.profile > 0) as profile:
                steps.append(
                    timed_step(accelerator, model, teacher, batch, losses, taps, optimizer, ema)
                )
    warmup, timed = steps[: args.warmup_steps], steps[args.warmup_steps :]
    shutil.rmtree(ema_file.parent, ignore_errors=True)
    counters_end = dynamo_counters()

    gflop = step_gflop(teacher.unet, student, latent_size, args.batch_size)
    median_step = statistics.median(s["seconds"]["step"] for s in timed)
    peak_gflops = bf16_matmul_peak(
        device, 256 if args.tiny else (8192 if device.type == "cuda" else 4096)
    )
    peak = peak_memory_gib(device)
    optimizer_state = [
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.numel() > 1
    ]
    components = {
        "student": tensor_gib(list(student.parameters())),
        "gradients": tensor_gib(list(student.parameters())),  # fp32, as the weights, at the peak
        "optimizer_state": tensor_gib(optimizer_state),
        # resident only: an EMA on disk is in the page cache, not in the process
        "ema": tensor_gib(ema.shadow_params)
        if isinstance(ema, StudentEMA) and not isinstance(ema, DiskEMA)
        else 0.0,
        "teacher": tensor_gib(list(teacher.parameters())),
    }
    components["libraries"] = baseline_memory if device.type == "cpu" else 0.0
    components["activations_and_other"] = peak - sum(components.values())
    return {
        "benchmark": f"distillation step, {args.losses} losses",
        "device": args.device,
        "teacher": f"{TEACHER} (tiny widths)" if args.tiny else TEACHER,
        "student_variant": VARIANT,
        "losses": {
            name: block.get("weight", 1.0) for name, block in LOSS_SETS[args.losses].items()
        },
        "layer_pairs": [list(pair) for pair in layer_pairs],
        "resolution": args.resolution,
        "latent_size": latent_size,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "compiled_blocks": compiled,
        "kernel_attention_modules": kernel_attention,
        "ema": not args.no_ema,
        "ema_storage": "disk" if isinstance(ema, DiskEMA) else ("memory" if ema else None),
        "ema_every": ema.every if ema is not None else None,
        "fused_adamw": not args.unfused_adamw,
        "kept_freed_memory": kept_freed_memory,
        "params": {"teacher": count_params(teacher), "student": count_params(student)},
        "setup_seconds": setup_seconds,
        "warmup_seconds": [s["seconds"]["step"] for s in warmup],
        "timed_steps": args.steps,
        "step_seconds": {
            "median": median_step,
            "min": min(s["seconds"]["step"] for s in timed),
            "all": [s["seconds"]["step"] for s in timed],
        },
        "images_per_second": args.batch_size / median_step,
        # Per phase, the median over the timed steps.
        "phase_seconds": {
            phase: statistics.median(s["seconds"][phase] for s in timed)
            for phase in timed[0]["seconds"]
            if phase != "step"
        },
        "gflop": gflop,
        "gflop_per_second": gflop["step"] / median_step,
        "bf16_matmul_peak_gflop_per_second": peak_gflops,
        "fraction_of_bf16_peak": gflop["step"] / median_step / peak_gflops,
        # Dynamo's counters after the warm-up and at the end: equal when nothing recompiled.
        "dynamo": {"after_warmup": counters_after_warmup, "end": counters_end},
        "loss_terms": timed[-1]["loss_terms"],
        "pair_terms": timed[-1]["pair_terms"],
        "memory_gib": {
            "kind": "peak allocated (GPU)" if device.type == "cuda" else "peak RSS",
            "peak": peak,
            "peak_after_setup": peak_after_setup,
            "components": components,
            "rss_end": current_rss_gib(),
        },
        "machine": facts,
        "load_average_end": list(os.getloadavg()),
        "profile": profile.top_ops(args.profile),  # the last step's; [] when not profiled
    }


class OpProfile:
    """`torch.profiler` over one step, summarised per op (self time: an op's own kernels, not
    its children's)."""

    def __init__(self) -> None:
        self.events: Any = None  # torch.profiler's key_averages(), once the step has run

    def top_ops(self, count: int) -> list[dict[str, Any]]:
        if self.events is None:
            return []
        rows = sorted(self.events, key=lambda e: e.self_cpu_time_total, reverse=True)[:count]
        return [
            {"op": e.key, "calls": e.count, "self_seconds": e.self_cpu_time_total / 1e6}
            for e in rows
        ]


@contextmanager
def op_profile(enabled: bool) -> Iterator[OpProfile]:
    result = OpProfile()
    if not enabled:
        yield result
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        yield result
    result.events = profiler.key_averages()


def timed_step(
    accelerator: Accelerator,
    model: nn.Module,
    teacher: FrozenTeacher,
    batch: NoisyBatch,
    losses: Sequence[Any],
    taps: StepTaps,
    optimizer: torch.optim.Optimizer,
    ema: Any,
) -> dict[str, Any]:
    """One step of the trainer's `optimizer_step`; seconds per phase (they add up to "step")
    and the raw loss terms."""
    device = accelerator.device
    synchronize(device)
    marks = PhaseMarks(device)

    def loss_step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with step_forward(accelerator):  # as the trainer's loss step
            total, terms = distillation_losses(model, teacher, batch, losses, taps)
        return total, {name: term.detach() for name, term in terms.items()}

    with ForwardClock(teacher, device) as teacher_clock, ForwardClock(model, device) as clock:
        outcome = optimizer_step(
            accelerator,
            model,
            optimizer,
            loss_step,
            accumulation=1,
            max_grad_norm=MAX_GRAD_NORM,
            ema=ema,
            clock=marks,
        )
    phases = marks.seconds()
    terms, total = outcome.terms.fetch(accelerator)
    return {
        "seconds": {
            "step": sum(phases.values()),
            "teacher_forward": teacher_clock.seconds,
            "student_forward": clock.seconds,
            "losses": phases["forward"] - teacher_clock.seconds - clock.seconds,
            "backward": phases["backward"],
            "optimizer": phases["optimizer"],
            "ema": phases["ema"],
        },
        # Each loss's term and the total; per-pair terms ("similarity/<layer>") apart.
        "loss_terms": {k: v for k, v in terms.items() if "/" not in k} | {"total": total},
        "pair_terms": {k: v for k, v in terms.items() if "/" in k},
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
        f"{'fused ' if result['fused_adamw'] else ''}AdamW, EMA "
        + (f"in {result['ema_storage']} every {result['ema_every']}" if result["ema"] else "off")
        + (f", {result['compiled_blocks']} compiled blocks" if result["compiled_blocks"] else "")
        + ("" if result["kept_freed_memory"] else ", glibc's malloc defaults")
        + (
            f", the CPU attention kernel in {result['kernel_attention_modules']} attention modules"
            if result["kernel_attention_modules"]
            else ", torch's attention"
        ),
        f"  teacher  {result['teacher']}: {result['params']['teacher']:,} params "
        f"({teacher_dtype}, frozen)",
        f"  student  {result['student_variant']}: {result['params']['student']:,} params "
        f"({student_weights}"
        + (
            f", {result['gradient_checkpointing']} gradient checkpointing"
            if result["gradient_checkpointing"]
            else ""
        )
        + ")",
        f"  batch {result['batch_size']} × {result['resolution']} px "
        f"({result['latent_size']}×{result['latent_size']} latents) on {machine['device']}",
        f"  machine  torch {machine['torch']}, threads {machine['threads']} of "
        f"{machine['cpu_count']} CPUs, {machine['cpu_capability']}, bf16: {bf16} "
        f"(oneDNN bf16 {'yes' if machine['onednn_bf16'] else 'no'})",
        "  load average (1/5/15 min): "
        f"start {' '.join(f'{x:.2f}' for x in machine['load_average'])}, "
        f"end {' '.join(f'{x:.2f}' for x in result['load_average_end'])}",
        f"setup {result['setup_seconds']:.1f} s, warm-up steps "
        + ", ".join(f"{s:.2f}" for s in result["warmup_seconds"])
        + " s",
        f"seconds per step over {result['timed_steps']}: median {step['median']:.2f}, "
        f"min {step['min']:.2f} ({result['images_per_second']:.3g} images/s)",
    ]
    lines += [f"  {phase:<16} {seconds:8.2f}" for phase, seconds in phases.items()]
    gflop = result["gflop"]
    lines += [
        f"model compute: {gflop['step'] / 1000:,.4g} TFLOP per step (teacher forward "
        f"{gflop['teacher_forward']:,.4g} + 3 × student forward {gflop['student_forward']:,.4g}"
        f" GFLOP), {result['gflop_per_second'] / 1000:,.4g} TFLOP/s = "
        f"{result['fraction_of_bf16_peak']:.1%} of the bf16 matmul peak measured here "
        f"({result['bf16_matmul_peak_gflop_per_second'] / 1000:,.4g} TFLOP/s)",
        f"{memory['kind']} {memory['peak']:.2f} GiB (after setup "
        f"{memory['peak_after_setup']:.2f}): "
        + ", ".join(f"{name} {gib:.2f}" for name, gib in memory["components"].items()),
    ]
    if result["compiled_blocks"]:
        dynamo = result["dynamo"]
        lines.append(
            f"dynamo: {dynamo['end']['unique_graphs']} graphs, "
            f"{dynamo['end']['graph_breaks']} graph breaks; after the warm-up "
            f"{dynamo['end']['unique_graphs'] - dynamo['after_warmup']['unique_graphs']} new graphs"
        )
    terms = ", ".join(f"{name} {value:.4g}" for name, value in result["loss_terms"].items())
    lines.append(f"last step's loss terms: {terms}")
    if result["profile"]:
        lines.append("costliest ops of the last step (torch.profiler, self time):")
        lines += [
            f"  {row['self_seconds']:7.3f} s  {row['calls']:6d} calls  {row['op']}"
            for row in result["profile"]
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result) if args.json else format_report(result))
    return result


if __name__ == "__main__":
    main()
