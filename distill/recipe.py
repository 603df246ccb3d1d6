"""Recipes: YAML files that name the teachers, the student, the data and an ordered list of stages.

Validation is strict (pydantic, `extra="forbid"`): an unknown key, a wrong type or a missing path is
one line naming the key, raised as UserInputError before anything is written. Components never see
the recipe object; the trainer reads plain values out of it (torchtune's "intrusive configs" rule).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.errors import UserInputError
from core.paths import HUB_ID
from distill.kinds import DEFAULT_KIND, KindOptions, stage_kind, validate_kind_options
from distill.losses import LossOptions, reads_teacher, validate_loss_blocks
from distill.preemption import DEFAULT_STOP_SIGNALS, signal_number
from students import VARIANTS, StudentVariant


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StudentSpec(_Strict):
    variant: str = "base"  # a students.VARIANTS name
    # Which teacher's weights initialize the student; its VAE, text encoder, tokenizer and
    # scheduler are the student pipeline's components.
    init_from: str

    # Transformer layers kept per down block (index 0 = highest resolution), the teacher's first
    # ones; overrides the variant's (KOALA's knob). None: the variant's, else the teacher's.
    transformer_depth: list[Annotated[int, Field(ge=1)]] | None = None

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, name: str) -> str:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
        return name

    def shape(self) -> StudentVariant:
        """The variant with this recipe's transformer depth, if it sets one."""
        variant = VARIANTS[self.variant]
        if self.transformer_depth is None:
            return variant
        return replace(variant, transformer_depth=tuple(self.transformer_depth))


class DataSpec(_Strict):
    source: str  # imagefolder, saved dataset, hub name, webdataset shards, or "fashion-mnist"
    split: str = "train"
    image_column: str = "image"
    text_column: str = "text"
    max_samples: Annotated[int, Field(gt=0)] | None = None
    streaming: bool = False
    resolution: Annotated[int, Field(gt=0)]
    center_crop: bool = True
    random_flip: bool = False
    # SDXL's original-size ids: the images' own sizes ("original"), or the training resolution
    # ("target", for data upscaled from one small size; see distill.data.PreprocessSpec).
    size_ids: Literal["original", "target"] = "original"
    cache_dir: str | None = None  # default: $SD_DISTILL_CACHE or ~/.cache/sd-distill
    # float16: ~0.13 MB per pair at 512 px with both flips; float32: twice the latents' size.
    cache_dtype: Literal["float16", "float32"] = "float16"
    encode_batch_size: Annotated[int, Field(gt=0)] = 32
    encode_workers: Annotated[int, Field(ge=0)] | None = None  # None: min(8, CPUs - 1)
    rows_per_shard: Annotated[int, Field(gt=0)] = 1024
    # How long a process waits for the others' part of the cache build (hours, not the 10
    # minutes of a process-group barrier: 212k images take hours on one GPU).
    cache_timeout_hours: Annotated[float, Field(gt=0)] = 24.0
    cache_per_node: bool = False  # one cache per node, when cache_dir is not on a shared disk


class EMASpec(_Strict):
    enabled: bool = True
    decay: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.999
    # diffusers' EMA warm-up: decay = 1 - (1 + step)^-power (capped at `decay`), so a short run's
    # average follows the weights at once (2/3: for runs of thousands of steps). None: diffusers'
    # default schedule min(decay, (1 + step) / (10 + step)).
    warmup_power: Annotated[float, Field(gt=0.0)] | None = None
    # Where the fp32 average lives (distill.ema): "memory" beside the weights; "disk" a file in
    # the run folder, rewritten tensor by tensor; "auto": disk for an SD-scale student (>= 1 GiB)
    # trained on a CPU by one process, where RAM is the scarce thing, else memory.
    storage: Literal["auto", "memory", "disk"] = "auto"
    # Update every k applied steps with the product of their decays; None: 1 in memory, 10 on
    # disk (its read and write of the whole average, amortized).
    every: Annotated[int, Field(gt=0)] | None = None


class TrainingSpec(_Strict):
    # "auto": bf16 where the device computes it natively (a CUDA GPU with bf16, a CPU with
    # AVX512-BF16 or AMX), else "no" (distill.precision.resolve_mixed_precision); "no": fp32.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # The trained weights' dtype (distill.precision). float64: a reference run whose numbers
    # agree across CPUs (every model cast to float64; no mixed precision).
    dtype: Literal["float32", "float64"] = "float32"
    # true: each block recomputed in the backward; "selective": only the cheap ops between its
    # convolutions, matmuls and attention; "auto": selective on a CPU, true on a GPU
    # (distill.activation_checkpointing). All give the same gradients.
    gradient_checkpointing: Literal["auto", "selective"] | bool = False
    # Regional torch.compile of the student and the stage teacher (distill.compilation): "auto"
    # compiles on CUDA, where it pays; on a CPU only when set to true.
    compile: Literal["auto"] | bool = "auto"
    max_grad_norm: Annotated[float, Field(gt=0.0)] | None = 1.0
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    weight_decay: Annotated[float, Field(ge=0.0)] = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    ema: EMASpec = EMASpec()
    uncond_prob: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1  # classifier-free dropout
    checkpoint_every: Annotated[int, Field(gt=0)] = 500
    keep_last: Annotated[int, Field(gt=0)] = 2
    log_every: Annotated[int, Field(gt=0)] = 10
    validate_every: Annotated[int, Field(ge=0)] = 0  # 0: only at each stage's end
    validation_prompts: list[str] = []
    validation_steps: Annotated[int, Field(gt=0)] = 25
    validation_guidance: Annotated[float, Field(ge=1.0)] = 5.0
    max_consecutive_nonfinite: Annotated[int, Field(gt=0)] = 5
    # DataLoader workers reading the cache ahead of the step; None: min(4, CPUs - 1).
    data_workers: Annotated[int, Field(ge=0)] | None = None
    # Signals that mean "you will be killed soon" (SLURM --signal=USR1@90, SIGTERM from SLURM,
    # Kubernetes and spot instances): finish the step, checkpoint, exit 75 (distill.preemption).
    stop_signals: list[str] = list(DEFAULT_STOP_SIGNALS)
    # Where the loss terms go besides RUN/logs/metrics.jsonl: accelerate's trackers, under
    # RUN/logs ("wandb" needs `pip install wandb`; WANDB_MODE=offline keeps it on disk).
    report_to: Literal["tensorboard", "wandb", "all", "none"] = "tensorboard"

    @field_validator("stop_signals")
    @classmethod
    def _known_signals(cls, names: list[str]) -> list[str]:
        for name in names:
            signal_number(name)  # ValueError names the unknown one
        return names

    @model_validator(mode="after")
    def _reference_runs_are_unmixed(self) -> TrainingSpec:
        if self.dtype == "float64" and self.mixed_precision not in ("no", "auto"):
            raise ValueError("dtype float64 (a reference run) needs mixed_precision: 'no'")
        return self


class StageSpec(_Strict):
    name: str
    # What the stage trains and how (distill.kinds): "distill" (the student against the target
    # and a teacher, through its loss blocks) or a registered kind; `options` is its block.
    kind: str = DEFAULT_KIND
    options: SerializeAsAny[KindOptions] = KindOptions()
    teacher: str | None = None  # a key of `teachers`; needed by every loss but "task"
    steps: Annotated[int, Field(gt=0)]
    batch_size: Annotated[int, Field(gt=0)]  # per process and per micro-step
    gradient_accumulation: Annotated[int, Field(gt=0)] = 1
    lr: Annotated[float, Field(gt=0.0)]
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    weight_decay: Annotated[float, Field(ge=0.0)] | None = None  # None: training.weight_decay
    ema: EMASpec | None = None  # None: the run's `training.ema`
    # Steps at which the stage's network (its EMA weights, as at the stage's end) is also saved,
    # as RUN/stages/NN-name/stepNNNNNNN/<component>.
    save_at: list[Annotated[int, Field(gt=0)]] = []
    # Loss name -> its block: weight, optional layer_pairs, and the loss's own options, each block
    # validated by that loss's schema (`distill.losses`), for kinds that take loss blocks.
    losses: dict[str, SerializeAsAny[LossOptions]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_old_loss_keys(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and _OLD_LOSS_KEYS & set(raw):
            raise ValueError(old_loss_keys_message(raw))
        return raw

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, name: str) -> str:
        stage_kind(name)
        return name

    @field_validator("options", mode="before")
    @classmethod
    def _kind_options(cls, options: Any, info: ValidationInfo) -> KindOptions:
        if "kind" not in info.data:  # the kind itself was refused
            return KindOptions()
        return validate_kind_options(info.data["kind"], options)

    @field_validator("losses", mode="before")
    @classmethod
    def _loss_blocks(cls, blocks: Any) -> dict[str, LossOptions] | None:
        return None if blocks is None else validate_loss_blocks(blocks)

    @model_validator(mode="after")
    def _kind_fits(self) -> StageSpec:
        kind = stage_kind(self.kind)
        if self.losses is not None and not kind.takes_losses:
            raise ValueError(f"losses: stage kind {self.kind!r} takes no loss blocks")
        if self.teacher is not None and not kind.uses_teacher:
            raise ValueError(f"teacher: stage kind {self.kind!r} trains without a teacher")
        if any(step > self.steps for step in self.save_at):
            raise ValueError(f"save_at: every step must be at most steps ({self.steps})")
        return self

    @property
    def loss_blocks(self) -> dict[str, LossOptions]:
        """The loss blocks in effect: the recipe's, or the task loss alone when the kind takes
        loss blocks and the stage gives none."""
        if self.losses is not None:
            return dict(self.losses)
        return {"task": LossOptions()} if stage_kind(self.kind).takes_losses else {}


# Before loss blocks, a stage had one weight per loss and one set of layer pairs for all of them.
_OLD_LOSS_KEYS = {"loss_weights", "layer_pairs", "similarity_max_positions"}


def old_loss_keys_message(stage: dict[str, Any]) -> str:
    """The old keys, and the `losses:` blocks that say the same thing, in one line."""
    weights = stage.get("loss_weights") or {"task": 1.0}
    blocks = {}
    for name, weight in weights.items():
        block: dict[str, Any] = {"weight": weight}
        if name in {"feature_kd", "similarity", "attention_relation"} and stage.get("layer_pairs"):
            block["layer_pairs"] = stage["layer_pairs"]
        if name in {"similarity", "attention_relation"} and "similarity_max_positions" in stage:
            block["max_positions"] = stage["similarity_max_positions"]
        blocks[name] = block
    new_form = yaml.safe_dump(
        {"losses": blocks}, default_flow_style=True, sort_keys=False, width=10_000
    ).strip()
    old = ", ".join(sorted(_OLD_LOSS_KEYS & set(stage)))
    return f"{old} were replaced by one block per loss; write {new_form}"


class Recipe(_Strict):
    name: str
    output_dir: str
    seed: int = 0
    teachers: dict[str, str]  # key -> local diffusers pipeline folder or hub id
    student: StudentSpec
    data: DataSpec
    training: TrainingSpec = TrainingSpec()
    stages: Annotated[list[StageSpec], Field(min_length=1)]

    @model_validator(mode="after")
    def _teachers_exist(self) -> Recipe:
        if self.student.init_from not in self.teachers:
            raise ValueError(f"student.init_from {self.student.init_from!r} is not in teachers")
        for i, stage in enumerate(self.stages):
            if stage.teacher is not None and stage.teacher not in self.teachers:
                raise ValueError(f"stages.{i}.teacher {stage.teacher!r} is not in teachers")
            if stage.teacher is None and reads_teacher(stage.loss_blocks):
                raise ValueError(
                    f"stages.{i} ({stage.name}) has losses that read a teacher, but no teacher"
                )
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError("stage names must be unique")
        return self


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override (`key.sub=value`, YAML-typed) and validate a recipe file."""
    path = Path(path)
    raw = read_raw_recipe(path)
    for override in overrides or []:
        apply_override(raw, override)
    return validate_recipe(raw, source=str(path))


def read_raw_recipe(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file as a mapping, with its `base:` applied.

    `base: other.yaml` (relative to this file) starts from that recipe; this file's keys replace
    the base's (mappings merge key by key; lists and values are replaced whole), then its
    `overrides:` (a list of `key.sub=value`, as on the command line) apply. A variant of a recipe
    is then the lines that differ, e.g. the three stages with `normalize: teacher`.
    """
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise UserInputError(f"cannot read recipe {str(path)!r}: {error.strerror}") from error
    except yaml.YAMLError as error:
        raise UserInputError(f"recipe {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise UserInputError(f"recipe {str(path)!r} must be a mapping of keys to values")
    base, own_overrides = raw.pop("base", None), raw.pop("overrides", [])
    if not isinstance(own_overrides, list):
        raise UserInputError(f"recipe {str(path)!r}: overrides must be a list of key.sub=value")
    if base is not None:
        base_path = (path.parent / str(base)).resolve()
        if base_path in _seen:
            raise UserInputError(f"recipe {str(path)!r}: base {str(base)!r} includes itself")
        raw = _merged(read_raw_recipe(base_path, (*_seen, path.resolve())), raw)
    for override in own_overrides:
        apply_override(raw, str(override))
    return raw


def _merged(base: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in own.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as error:
        raise validation_error(error, source) from None


def read_saved_recipe(path: Path) -> dict[str, Any]:
    """A run folder's saved recipe.yaml, read through today's schema: a key added to the schema
    since the run was saved takes its default, so a run saved before it is still the same recipe
    (it trained with what is now that default). One the schema refuses is returned as saved."""
    saved = yaml.safe_load(path.read_text())
    try:
        return Recipe.model_validate(saved).model_dump(mode="json")
    except ValidationError:
        return saved


def validation_error(error: ValidationError, source: str, prefix: str = "") -> UserInputError:
    """pydantic's first complaint as one line: `source: key.sub: what is wrong`."""
    first = error.errors()[0]
    # A union field (`layer_pairs`: a list or a preset name) puts the member's type in the path,
    # e.g. `list[tuple[str, str]]`; users wrote keys and indices, so only those are shown.
    parts = [str(part) for part in first["loc"] if not _is_union_tag(part)]
    location = prefix + ".".join(parts) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    return UserInputError(f"{source}: {location}: {message}")


def _is_union_tag(part: object) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("none", "str", "int", "float"))


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.0.c=value` in the raw recipe; the value is parsed as YAML (`1e-4`, `true`)."""
    if "=" not in override:
        raise UserInputError(f"override {override!r} must look like key.sub=value")
    dotted, value = override.split("=", 1)
    keys = dotted.split(".")
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        node = _child(node, key, ".".join(keys[: depth + 1]))
    last = keys[-1]
    parsed = yaml.safe_load(value) if value else None
    if isinstance(node, list):
        node[_index(node, last, dotted)] = parsed
    elif isinstance(node, dict):
        node[last] = parsed
    else:
        raise UserInputError(f"override {dotted!r}: {'.'.join(keys[:-1])} is not a mapping")


def _child(node: Any, key: str, where: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, key, where)]
    if isinstance(node, dict):
        if node.get(key) is None:
            node[key] = {}
        return node[key]
    raise UserInputError(f"override: {where} is not a mapping or list")


def _index(node: list, key: str, where: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise UserInputError(f"override {where!r}: index {key} out of range (0..{len(node) - 1})")
    return int(key)


def resolve_paths(recipe: Recipe, recipe_dir: Path) -> Recipe:
    """Make local teacher and data paths absolute; a path that does not exist is an error.

    A value is tried relative to the current directory (how a user types it), then to the
    recipe's folder. One that exists nowhere may still be a hub id (`owner/name`) or, for data, a
    hub dataset name, a webdataset shard pattern or a builtin source; anything else is a missing
    path, reported by its key.
    """

    def resolve(key: str, value: str, allow_name: bool) -> str:
        for candidate in (Path(value), recipe_dir / value):
            if candidate.exists():
                return str(candidate.resolve())
        if HUB_ID.match(value) or (allow_name and _NAME_OR_PATTERN.search(value)):
            return value
        raise UserInputError(f"{key}: {value!r} does not exist (and is not a hub id owner/name)")

    teachers = {
        key: resolve(f"teachers.{key}", value, False) for key, value in recipe.teachers.items()
    }
    data = recipe.data.model_copy(
        update={"source": resolve("data.source", recipe.data.source, True)}
    )
    return recipe.model_copy(update={"teachers": teachers, "data": data})


# Builtin source names have no slash ("fashion-mnist"); shard patterns have glob or brace syntax.
_NAME_OR_PATTERN = re.compile(r"^[\w.-]+$|[*?{]")
