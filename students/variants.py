"""Student variants as data, and the config transform that turns a teacher UNet config into one.

The three variants are the block-removal students of BK-SDM (Kim et al. 2023), of which `base` is
also the student of small-stable-diffusion-v0:

- `base`:  every stage keeps one layer (`layers_per_block=1`) instead of two.
- `small`: `base` without the mid block.
- `tiny`:  `small` without the deepest stage (last down block and first up block).

and `full`, the teacher's own architecture with every layer: for a UNet trained from scratch (the
offline world's teachers) or made few-step without being made smaller.

The transform works on any diffusers `UNet2DConditionModel` config (SD 1.x, SD 2.x, SDXL): it only
edits the keys diffusers defines per block, so per-block lists stay aligned with the blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.errors import UserInputError
from core.families import family_for


@dataclass(frozen=True)
class StudentVariant:
    """How a student shrinks its teacher. `transformer_depth`: transformer layers per down block
    (index 0 = highest resolution; blocks without attention ignore theirs), each block keeping
    the teacher's first ones; the mid block keeps the deepest block's depth. None: the teacher's.
    `family`: the teacher family it is defined for (None: any)."""

    name: str
    description: str
    layers_per_block: int | None = 1  # None: the teacher's
    keep_mid_block: bool = True
    drop_deepest_stage: bool = False
    transformer_depth: tuple[int, ...] | None = None
    family: str | None = None


VARIANTS: dict[str, StudentVariant] = {
    v.name: v
    for v in (
        StudentVariant("base", "layers_per_block=1 (small-stable-diffusion-v0, BK-SDM-Base)"),
        StudentVariant(
            "full", "the teacher's own architecture, every layer", layers_per_block=None
        ),
        StudentVariant("small", "base without the mid block (BK-SDM-Small)", keep_mid_block=False),
        StudentVariant(
            "tiny",
            "small without the deepest stage (BK-SDM-Tiny)",
            keep_mid_block=False,
            drop_deepest_stage=True,
        ),
        # KOALA (Lee et al. 2023, arXiv 2312.04005): SDXL's UNet (2,567,463,684 parameters) with
        # one layer per block and the deepest stage's 10 transformer layers cut to 6 (KOALA-1B,
        # published 1.16B) or to 5 with no mid block (KOALA-700M, published 782M). Block layouts
        # as the public KOALA checkpoints have them (ComfyUI's model-detection table lists
        # transformer depths [0, 2, 6] / mid 6 and [0, 2, 5] / no mid, one resnet per block).
        StudentVariant(
            "koala-1b",
            "SDXL, layers_per_block=1, deepest stage 6 transformer layers (KOALA-1B)",
            transformer_depth=(1, 2, 6),
            family="sdxl",
        ),
        StudentVariant(
            "koala-700m",
            "SDXL, layers_per_block=1, deepest stage 5 transformer layers, no mid (KOALA-700M)",
            keep_mid_block=False,
            transformer_depth=(1, 2, 5),
            family="sdxl",
        ),
    )
}

# Keys of UNet2DConditionModel's config that may hold one entry per block, listed in down-block
# order (index 0 = highest resolution) or in up-block order (index 0 = lowest resolution).
_PER_BLOCK_DOWN_ORDER = (
    "block_out_channels",
    "down_block_types",
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "only_cross_attention",
    "transformer_layers_per_block",
    "layers_per_block",
)
_PER_BLOCK_UP_ORDER = ("up_block_types", "reverse_transformer_layers_per_block")


def get_variant(name: str | StudentVariant) -> StudentVariant:
    if isinstance(name, StudentVariant):
        return name
    if name not in VARIANTS:
        raise UserInputError(f"unknown student variant {name!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[name]


def max_layers_per_block(config: Mapping[str, Any]) -> int:
    layers = config["layers_per_block"]
    return max(layers) if isinstance(layers, list | tuple) else int(layers)


def student_config(teacher_config: Mapping[str, Any], variant: str | StudentVariant) -> dict:
    """The student's UNet config: the teacher's with fewer layers, blocks or no mid block.

    Raises UserInputError when the teacher cannot be shrunk this way (already one layer per block
    for `base`, or too few stages for `tiny`).
    """
    variant = get_variant(variant)
    config = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    family = family_for(None, config).name
    if variant.family is not None and variant.family != family:
        raise UserInputError(
            f"variant {variant.name!r} is defined for {variant.family} teachers; this is an "
            f"{family} teacher (variants for any teacher: base, small, tiny)"
        )
    teacher_layers = max_layers_per_block(config)
    if variant.name == "base" and teacher_layers <= variant.layers_per_block:
        raise UserInputError(
            f"teacher already has layers_per_block={teacher_layers}; "
            f"variant 'base' needs a teacher with more than {variant.layers_per_block}"
        )
    if variant.layers_per_block is not None:
        config["layers_per_block"] = variant.layers_per_block
        config = _prune_nested_transformer_layers(config, variant.layers_per_block)
    if variant.transformer_depth is not None:
        config = _cut_transformer_depth(config, variant)
    if not variant.keep_mid_block:
        config["mid_block_type"] = None
    if variant.drop_deepest_stage:
        config = _drop_deepest_stage(config)
    return config


def _cut_transformer_depth(config: dict, variant: StudentVariant) -> dict:
    """Each down block keeps the teacher's first `transformer_depth[i]` transformer layers."""
    depths = list(variant.transformer_depth)
    teacher = config.get("transformer_layers_per_block", 1)
    blocks = len(config["down_block_types"])
    teacher = list(teacher) if isinstance(teacher, list | tuple) else [teacher] * blocks
    if len(teacher) != len(depths) or any(isinstance(d, list | tuple) for d in teacher):
        raise UserInputError(
            f"variant {variant.name!r} is defined for {len(depths)}-stage teachers with one "
            f"transformer depth per block (an {variant.family or 'SD'} UNet); this teacher has "
            f"transformer_layers_per_block={config.get('transformer_layers_per_block')}"
        )
    if any(d > t for d, t in zip(depths, teacher, strict=True)):
        raise UserInputError(
            f"variant {variant.name!r} keeps {depths} transformer layers, the teacher has {teacher}"
        )
    config["transformer_layers_per_block"] = depths
    return config


def _drop_deepest_stage(config: dict) -> dict:
    n_blocks = len(config["down_block_types"])
    if n_blocks < 2:
        raise UserInputError(f"a teacher with {n_blocks} stage(s) has no stage to drop for 'tiny'")
    for key in _PER_BLOCK_DOWN_ORDER:
        if _is_per_block(config.get(key), n_blocks):
            config[key] = list(config[key])[:-1]  # the deepest stage is the last down block
    for key in _PER_BLOCK_UP_ORDER:
        if _is_per_block(config.get(key), n_blocks):
            config[key] = list(config[key])[1:]  # ...and the first up block
    return config


def _prune_nested_transformer_layers(config: dict, layers: int) -> dict:
    """Per-layer transformer depths (lists of lists) must shrink with the layer count.

    Down blocks keep their first `layers` entries; up blocks (one more layer each) keep their first
    `layers` and their last, matching the layer map in `students.init_map`.
    """
    down = config.get("transformer_layers_per_block")
    if isinstance(down, list | tuple) and down and isinstance(down[0], list | tuple):
        config["transformer_layers_per_block"] = [list(d[:layers]) for d in down]
    up = config.get("reverse_transformer_layers_per_block")
    if isinstance(up, list | tuple) and up and isinstance(up[0], list | tuple):
        config["reverse_transformer_layers_per_block"] = [list(u[:layers]) + [u[-1]] for u in up]
    return config


def _is_per_block(value: Any, n_blocks: int) -> bool:
    return isinstance(value, list | tuple) and len(value) == n_blocks
