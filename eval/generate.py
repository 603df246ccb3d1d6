"""Images for a prompt list from a diffusers pipeline of any family, resumable, never stale.

Everything that changes the pixels is one `GenerationSettings`. Two seedings:

- `per-image` (the default): image i uses prompt i and seed `seed + i`, with its own CPU
  `torch.Generator`: its initial noise does not depend on the device or on which images were
  already on disk.
- `one-generator` (BK-SDM's `src/generate.py`, `distill eval --parity bk-sdm`): one generator on
  the pipeline's device, seeded once, drawn from in prompt order. Image i's noise then depends on
  every image before it, so the generator's state after each finished batch is stored beside the
  images (`generator/{i:06d}.state`); a resumed run restarts from the last stored state before
  the first missing image and ends bit-identical to an uninterrupted one.

Batches are fixed by index: images [k·B, (k+1)·B) always form one batch, because a batch's
composition changes the float kernels (an image generated in a batch of 1 differs in the last bit
from the same image in a batch of 4). Each image is written as `{i:06d}.png` the moment its batch
finishes (via a temporary name, so a killed run never leaves half an image). A rerun into the same
folder resumes: a batch with any image missing is generated again as a whole and only the missing
files are written, so an interrupted run ends bit-identical to an uninterrupted one.

`image_format: jpeg` writes BK-SDM's files: the pipeline's image saved as a JPEG (Pillow's default
quality), decoded again, resized with `Image.resize((s, s))` and saved as a JPEG, as their
`generate.py` and `change_img_size` do through the disk.

`manifest.json` records the model's fingerprint (`core.fingerprints`: a content hash of its
weights), every generation setting, and each image's prompt and seed. When the fingerprint or a
setting differs from what is on disk (a student retrained at the same path, another guidance
scale), the old images are deleted and generated anew; an image whose prompt or seed changed is
deleted alone. A number computed from these images is therefore always one of this model's.

BK-SDM's protocol (`src/generate.py`): PNDM, 25 steps, guidance 7.5, 512 px, then
`Image.resize((256, 256))` (bicubic).
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
)
from PIL import Image
from tqdm.auto import tqdm

from core.atomic import atomic_path, write_text_atomic
from core.errors import UserInputError
from core.fingerprints import pipeline_fingerprint, short
from eval.image_io import resize_square

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 1: settings without fingerprint, batch size, dtype or device
# The files generate_images owns in its folder: images, their temporary names, the manifest.
_OWN_FILE = re.compile(r"^\.?\d{6,}\.(png|jpg)(\.\d+\.tmp)?$")
GENERATOR_STATES = "generator"  # one-generator seeding: the state after each finished batch
SEEDINGS = ("per-image", "one-generator")
IMAGE_FORMATS = {"png": "png", "jpeg": "jpg"}  # format -> file suffix
SCHEDULERS = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "lcm": LCMScheduler,
}
# SD v1.x ships PNDM with `skip_prk_steps=True` (PLMS steps only; what BK-SDM ran). Built from
# another scheduler's config, PNDM would default to Runge-Kutta warm-up steps (extra UNet calls).
SCHEDULER_OVERRIDES: dict[str, dict[str, Any]] = {"pndm": {"skip_prk_steps": True}}


@dataclass(frozen=True)
class GenerationSettings:
    """Everything an evaluation's images depend on besides the model and the prompts.
    `height`, `width` None: the pipeline's native size; `output_size`: resize the saved images to
    squares of that side (BK-SDM: 512 → 256); `seeding` and `image_format`: the module docstring."""

    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    output_size: int | None = None
    scheduler: str = "pndm"
    batch_size: int = 4
    seed: int = 0
    seeding: str = "per-image"
    image_format: str = "png"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserInputError(f"batch_size must be positive, got {self.batch_size}")
        if self.seeding not in SEEDINGS:
            raise UserInputError(f"unknown seeding {self.seeding!r}; choose {', '.join(SEEDINGS)}")
        if self.image_format not in IMAGE_FORMATS:
            raise UserInputError(
                f"unknown image format {self.image_format!r}; choose {', '.join(IMAGE_FORMATS)}"
            )

    def with_steps(self, steps: int | None) -> GenerationSettings:
        return self if steps is None else replace(self, num_inference_steps=steps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GeneratedImages:
    """`paths[i]` shows `prompts[i]` generated from seed `seeds[i]` by the model with
    `fingerprint`; `newly_generated` lists the indices this call wrote (the rest were already on
    disk), `stale` says why old images were deleted first (None: nothing was), `seconds` is the
    time spent in the pipeline and `images_computed` how many images it made (whole batches)."""

    folder: Path
    paths: list[Path]
    prompts: list[str]
    seeds: list[int]
    settings: dict[str, Any]
    newly_generated: list[int]
    fingerprint: str
    stale: str | None = None
    seconds: float = 0.0
    images_computed: int = 0

    @property
    def images_per_second(self) -> float | None:
        return self.images_computed / self.seconds if self.seconds > 0 else None


def image_path(folder: str | Path, index: int, image_format: str = "png") -> Path:
    return Path(folder) / f"{index:06d}.{IMAGE_FORMATS[image_format]}"


def reads_guidance_embedding(pipeline: DiffusionPipeline) -> bool:
    """A few-step (consistency) student: its UNet reads the guidance scale through an embedding
    (`time_cond_proj_dim`), so it samples in one pass per step, without classifier-free guidance."""
    return getattr(pipeline.unet.config, "time_cond_proj_dim", None) is not None


def sampler_name(pipeline: DiffusionPipeline, requested: str) -> str:
    """The scheduler a pipeline is sampled with: `requested`, except that a few-step student
    keeps its own (the one its stage kind saved with it, LCMScheduler): PNDM would sample it as
    a 25-step model and ruin it."""
    if reads_guidance_embedding(pipeline):
        own = {cls: name for name, cls in SCHEDULERS.items()}.get(type(pipeline.scheduler))
        if own is not None:
            return own
    return requested


def scheduler_for(pipeline: DiffusionPipeline, name: str) -> Any:
    """The pipeline's scheduler if it already is `name`, else `name` built from its config."""
    if name not in SCHEDULERS:
        raise UserInputError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    scheduler_class = SCHEDULERS[name]
    if type(pipeline.scheduler) is scheduler_class:
        return pipeline.scheduler
    return scheduler_class.from_config(
        pipeline.scheduler.config, **SCHEDULER_OVERRIDES.get(name, {})
    )


@contextmanager
def using_scheduler(pipeline: DiffusionPipeline, name: str) -> Iterator[None]:
    """Run the pipeline with scheduler `name` inside the block, then restore its own."""
    original = pipeline.scheduler
    pipeline.scheduler = scheduler_for(pipeline, name)
    try:
        yield
    finally:
        pipeline.scheduler = original


def generate_images(
    pipeline: DiffusionPipeline,
    prompts: Sequence[str],
    out_dir: str | Path,
    settings: GenerationSettings | None = None,
    *,
    fingerprint: str | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> GeneratedImages:
    """Generate image i of `prompts[i]` into `out_dir` under `settings`, keeping files that this
    model made with these settings. The pipeline's scheduler is swapped for `settings.scheduler`
    during the call and restored after it (a few-step student keeps its own: `sampler_name`; the
    manifest records the one used).

    `fingerprint` identifies the weights (`core.fingerprints.pipeline_fingerprint` of the folder
    the pipeline was loaded from); None hashes the loaded pipeline's components instead."""
    if not prompts:
        raise UserInputError("no prompts to generate images for")
    settings = settings or GenerationSettings()
    scheduler = sampler_name(pipeline, settings.scheduler)
    native = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    height, width = settings.height or native, settings.width or native
    # Everything that changes the pixels; batch_size too, since batches are fixed by index.
    recorded = {
        "scheduler": scheduler,
        "num_inference_steps": settings.num_inference_steps,
        "guidance_scale": settings.guidance_scale,
        "height": height,
        "width": width,
        "output_size": settings.output_size,
        "batch_size": settings.batch_size,
        "dtype": str(pipeline.unet.dtype).removeprefix("torch."),
        "device": pipeline.device.type,
    }
    # Recorded only where they differ from the defaults: manifests written before they existed
    # stay valid (their images were made per image, as PNGs).
    if settings.seeding != "per-image":
        # The seed too: another seed must delete the stored generator states with the images.
        recorded["seeding"] = settings.seeding
        recorded["seed"] = settings.seed
    if settings.image_format != "png":
        recorded["image_format"] = settings.image_format
    fingerprint = fingerprint or pipeline_fingerprint(pipeline)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    one_generator = settings.seeding == "one-generator"
    seeds = [settings.seed + (0 if one_generator else index) for index in range(len(prompts))]
    path = lambda index: image_path(folder, index, settings.image_format)
    entries = [
        {"file": path(i).name, "prompt": prompt, "seed": seed}
        for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True))
    ]
    stale = _remove_stale(folder, fingerprint, recorded, entries)
    model_name = str(pipeline.config.get("_name_or_path", "") or type(pipeline.unet).__name__)
    manifest = {
        "version": MANIFEST_VERSION,
        "model": model_name,  # informative only: a copy at another path is the same model
        "fingerprint": fingerprint,
        "settings": recorded,
        "images": entries,
    }
    _write_json(folder / MANIFEST, manifest)

    batch_size = settings.batch_size
    missing = [i for i in range(len(prompts)) if not path(i).is_file()]
    if one_generator:
        batches, generator = _one_generator_batches(
            folder, missing, len(prompts), settings, pipeline
        )
    else:
        batches = _batches_to_run(missing, len(prompts), batch_size)
    pipeline.set_progress_bar_config(disable=True)  # one bar over images, not one per batch
    total = sum(len(batch) for batch in batches)
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress or total == 0)
    start = time.perf_counter()
    with using_scheduler(pipeline, scheduler):
        for batch in batches:
            images = pipeline(
                [prompts[i] for i in batch],
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                height=height,
                width=width,
                # Per image: CPU generators, the same seed gives the same noise on every device.
                generator=generator
                if one_generator
                else [torch.Generator("cpu").manual_seed(seeds[i]) for i in batch],
                output_type="pil",
            ).images
            for index, image in zip(batch, images, strict=True):
                if path(index).is_file():
                    continue  # present: keep the file (and its mtime) as it is
                _save_image(image, path(index), settings)
            if one_generator:
                _save_generator_state(folder, batch[-1], generator)
            bar.update(len(batch))
    seconds = time.perf_counter() - start if batches else 0.0
    bar.close()
    return GeneratedImages(
        folder=folder,
        paths=[path(i) for i in range(len(prompts))],
        prompts=list(prompts),
        seeds=seeds,
        settings=recorded,
        newly_generated=missing,
        fingerprint=fingerprint,
        stale=stale,
        seconds=seconds,
        images_computed=total,
    )


def _one_generator_batches(
    folder: Path,
    missing: list[int],
    count: int,
    settings: GenerationSettings,
    pipeline: DiffusionPipeline,
) -> tuple[list[list[int]], torch.Generator | None]:
    """The batches to run with one generator, and that generator in the state it had before the
    first of them: from the last batch whose preceding state is stored, up to the end (every
    image after the first missing one depends on the draws before it)."""
    if not missing:
        return [], None
    size = settings.batch_size
    generator = torch.Generator(pipeline.device).manual_seed(settings.seed)
    start = missing[0] - missing[0] % size
    while start > 0 and not _generator_state_file(folder, start - 1).is_file():
        start -= size
    if start > 0:
        state = np.frombuffer(_generator_state_file(folder, start - 1).read_bytes(), np.uint8)
        generator.set_state(torch.from_numpy(state.copy()))
    batches = [list(range(s, min(s + size, count))) for s in range(start, count, size)]
    return batches, generator


def _generator_state_file(folder: Path, index: int) -> Path:
    return folder / GENERATOR_STATES / f"{index:06d}.state"


def _save_generator_state(folder: Path, index: int, generator: torch.Generator) -> None:
    """The generator's state once image `index` (a batch's last) is drawn, as raw bytes."""
    target = _generator_state_file(folder, index)
    target.parent.mkdir(exist_ok=True)
    with atomic_path(target) as partial:
        partial.write_bytes(generator.get_state().numpy().tobytes())


def _save_image(image: Image.Image, path: Path, settings: GenerationSettings) -> None:
    """PNG: the image, resized to `output_size` when asked. JPEG: BK-SDM's path through the disk,
    the pipeline's image encoded, decoded, resized by Pillow's default filter and encoded again."""
    if settings.image_format == "jpeg":
        encoded = io.BytesIO()
        image.save(encoded, format="JPEG")
        with atomic_path(path) as partial:
            if settings.output_size is None:
                partial.write_bytes(encoded.getvalue())  # their one save, at the native size
            else:
                size = (settings.output_size, settings.output_size)
                Image.open(encoded).resize(size).save(partial, format="JPEG")
        return
    if settings.output_size is not None:
        image = resize_square(image, settings.output_size)
    _save_png(image, path)


def delete_generated_images(folder: str | Path) -> int:
    """Delete what `generate_images` wrote into `folder` (the manifest first, so a run killed
    half-way never leaves a manifest vouching for images it no longer describes); other files
    are left alone. Returns the number of images deleted."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    (folder / MANIFEST).unlink(missing_ok=True)
    states = folder / GENERATOR_STATES
    if states.is_dir():
        for state in states.iterdir():  # states and a killed writer's temporary files
            state.unlink()
        states.rmdir()
    deleted = 0
    for path in folder.iterdir():
        if _OWN_FILE.match(path.name) and path.is_file():
            path.unlink()
            deleted += path.suffix in (".png", ".jpg")
    return deleted


def _batches_to_run(missing: list[int], count: int, batch_size: int) -> list[list[int]]:
    """The fixed batches [k·B, (k+1)·B) that hold at least one missing index, whole."""
    starts = sorted({index - index % batch_size for index in missing})
    return [list(range(start, min(start + batch_size, count))) for start in starts]


def _batch_end(index: int, batch_size: int, count: int) -> int:
    """End of the fixed batch holding `index` among `count` images."""
    return min((index // batch_size + 1) * batch_size, count)


def _remove_stale(
    folder: Path, fingerprint: str, settings: dict[str, Any], entries: list[dict[str, Any]]
) -> str | None:
    """Delete images in `folder` that were not made by this model with these settings, prompts
    and seeds; return why (None when everything on disk could stay)."""
    previous = _read_json(folder / MANIFEST)
    if previous is None:
        reason = "no manifest" if any(_OWN_FILE.match(p.name) for p in folder.iterdir()) else None
    elif previous.get("fingerprint") != fingerprint:
        old = previous.get("fingerprint")
        reason = f"model fingerprint changed ({short(old)} -> {short(fingerprint)})"
    elif previous.get("settings") != settings:
        changed = sorted(
            key
            for key in set(settings) | set(previous.get("settings") or {})
            if settings.get(key) != (previous.get("settings") or {}).get(key)
        )
        reason = f"generation settings changed ({', '.join(changed)})"
    else:
        old_entries = previous.get("images") or []
        changed = [i for i, old in enumerate(old_entries) if i >= len(entries) or old != entries[i]]
        # Another image count changes the last batch: its images were made beside others.
        batch, old_count, count = settings["batch_size"], len(old_entries), len(entries)
        rebatched = [
            i
            for i in range(min(old_count, count))
            if i not in changed and _batch_end(i, batch, old_count) != _batch_end(i, batch, count)
        ]
        for index in changed + rebatched:
            image_path(folder, index, settings.get("image_format", "png")).unlink(missing_ok=True)
        reasons = []
        if changed:
            reasons.append(f"{len(changed)} images with another prompt or seed")
        if rebatched:
            reasons.append(f"{len(rebatched)} images whose batch changed with the image count")
        return "; ".join(reasons) or None
    if reason is not None:
        delete_generated_images(folder)
    return reason


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as partial:
        image.save(partial, format="PNG")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False))
