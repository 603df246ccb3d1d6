"""Which teacher tensor initializes which student tensor, derived from the two UNet configs.

The rule (BK-SDM, small-stable-diffusion-v0), stated on diffusers' generic UNet naming:

- Blocks align from the outside in. Student down block i is teacher down block i; when the student
  has fewer stages (variant `tiny`), the deepest ones are the ones missing, so student up block i is
  teacher up block i + (n_teacher - n_student).
- A down block keeps its first layers: student `resnets.j` <- teacher `resnets.j`.
- An up block has `layers_per_block + 1` layers, and its LAST one takes the skip connection from the
  previous stage's downsampler (or conv_in), so it has a different input width from the others. A
  student up block therefore keeps the teacher's first layers and its last one: with one layer per
  block, student `resnets.1` <- teacher `resnets.2` (copying teacher `resnets.1` fails on shape:
  1920 vs 2560 input channels in SD v1.4's second up block).
- Everything else (conv_in, time embedding, added-condition embeddings, mid block, samplers, norms,
  conv_out) keeps its name.

No name is model-specific, and nothing here looks at weights: the builder checks every shape.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from core.families import unet_from_config
from students.variants import max_layers_per_block

# `down_blocks.1.resnets.0.conv1.weight` -> ("down_blocks", "1", "resnets", "0", ".conv1.weight");
# a module path such as `up_blocks.1.attentions.2` matches too, with an empty rest.
_LAYER_KEY = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)((?:\..+)?)$")
_BLOCK_KEY = re.compile(r"^(down_blocks|up_blocks)\.(\d+)((?:\..+)?)$")


def layer_index_map(student_layers: int, teacher_layers: int, keep_last: bool) -> list[int]:
    """Teacher layer index for each student layer of one block.

    >>> layer_index_map(1, 2, keep_last=False)  # down block
    [0]
    >>> layer_index_map(2, 3, keep_last=True)  # up block: first and last
    [0, 2]
    """
    if student_layers > teacher_layers:
        raise ValueError(f"student has {student_layers} layers, teacher only {teacher_layers}")
    if not keep_last:
        return list(range(student_layers))
    return list(range(student_layers - 1)) + [teacher_layers - 1]


def block_pairs(
    student_config: Mapping[str, Any], teacher_config: Mapping[str, Any]
) -> list[tuple[str, str]]:
    """(student module path, teacher module path) for every stage output, in forward order.

    These are the natural layer pairs for feature distillation: each has the same resolution and,
    for the block-removal variants, the same width on both sides. One exception is derived from
    the configs: when the student's deepest kept down block is its last one (variant `tiny`), it
    has no downsampler while the teacher's block of that index has one, so their block outputs
    differ in resolution (16×16 vs 8×8 in SD v1.4 at 512 px). That stage is then paired before
    the downsampler, at its last layer, as BK-SDM-Tiny does: the student's last attention
    `proj_out` with the teacher's (or the last resnets, in a block without attention).
    """
    offset = _up_block_offset(student_config, teacher_config)
    n_student = len(student_config["down_block_types"])
    n_teacher = len(teacher_config["down_block_types"])
    pairs = []
    for block in range(n_student):
        if block == n_student - 1 < n_teacher - 1:  # student: final block; teacher: downsamples
            pairs.append(_last_layer_pair(block, student_config, teacher_config))
        else:
            pairs.append((f"down_blocks.{block}", f"down_blocks.{block}"))
    if (
        student_config.get("mid_block_type", "") is not None
        and teacher_config.get("mid_block_type", "") is not None
    ):
        pairs.append(("mid_block", "mid_block"))
    pairs += [(f"up_blocks.{i}", f"up_blocks.{i + offset}") for i in range(n_student)]
    return pairs


def _last_layer_pair(
    block: int, student_config: Mapping[str, Any], teacher_config: Mapping[str, Any]
) -> tuple[str, str]:
    """The last layer of down block `block` in both models, before any downsampler."""
    has_attention = "CrossAttn" in student_config["down_block_types"][block]
    kind, suffix = ("attentions", ".proj_out") if has_attention else ("resnets", "")
    last = [
        _layers_in_block(config, "down_blocks", block) - 1
        for config in (student_config, teacher_config)
    ]
    return (
        f"down_blocks.{block}.{kind}.{last[0]}{suffix}",
        f"down_blocks.{block}.{kind}.{last[1]}{suffix}",
    )


def teacher_key_for(
    student_key: str, student_config: Mapping[str, Any], teacher_config: Mapping[str, Any]
) -> str:
    """The teacher state-dict key (or module path) that initializes `student_key`; the teacher
    may have no such key."""
    offset = _up_block_offset(student_config, teacher_config)
    match = _LAYER_KEY.match(student_key)
    if match:
        kind, block, layer_kind, layer, rest = match.groups()
        block, layer = int(block), int(layer)
        student_layers = _layers_in_block(student_config, kind, block)
        teacher_block = block + offset if kind == "up_blocks" else block
        teacher_layers = _layers_in_block(teacher_config, kind, teacher_block)
        index = layer_index_map(student_layers, teacher_layers, keep_last=kind == "up_blocks")
        return f"{kind}.{teacher_block}.{layer_kind}.{index[layer]}{rest}"
    match = _BLOCK_KEY.match(student_key)
    if match and match.group(1) == "up_blocks":  # up-block samplers move with their block
        return f"up_blocks.{int(match.group(2)) + offset}{match.group(3)}"
    return student_key


def self_attention_pairs(
    student_config: Mapping[str, Any],
    teacher_config: Mapping[str, Any],
    projection: str | None = "to_q",
    blocks: tuple[str, ...] | None = None,
) -> list[tuple[str, str]]:
    """(student, teacher) paths of every student self-attention (`attn1`), or of one of its
    projections (`to_q`, `to_k`, `to_v`), each paired with the teacher attention it is
    initialized from: transformer layer k with the teacher's layer k (a student keeps the first
    ones). `blocks`: only paths under these prefixes (e.g. the deepest stage's blocks).

    Module names come from meta-device models built from the configs (no weights), so the list
    follows any block layout and transformer depth; pairs whose teacher module does not exist are
    left out.
    """
    suffix = ".attn1" if projection is None else f".attn1.{projection}"
    teacher = unet_from_config(dict(teacher_config), "meta")
    teacher_paths = {name for name, _ in teacher.named_modules()}
    student = unet_from_config(dict(student_config), "meta")
    pairs = []
    for path, _ in student.named_modules():
        if not path.endswith(suffix) or (blocks and not path.startswith(blocks)):
            continue
        teacher_path = teacher_key_for(path, student_config, teacher_config)
        if teacher_path in teacher_paths:
            pairs.append((path, teacher_path))
    return pairs


def deepest_self_attention_pairs(
    student_config: Mapping[str, Any], teacher_config: Mapping[str, Any]
) -> list[tuple[str, str]]:
    """KOALA's self-attention distillation layers (Lee et al. 2023, arXiv 2312.04005, which found
    self-attention the feature that matters most): the outputs of the self-attentions at the
    student's deepest resolution (its last down block, the mid block, its first up block),
    transformer layer by layer, each against the teacher's layer of the same depth."""
    last = len(student_config["down_block_types"]) - 1
    deepest = (f"down_blocks.{last}.", "mid_block.", "up_blocks.0.")
    return self_attention_pairs(student_config, teacher_config, None, blocks=deepest)


# Named sets of layer pairs a feature loss can use instead of an explicit list.
PAIR_PRESETS = {
    "stage_outputs": block_pairs,
    "self_attention": lambda s, t: self_attention_pairs(s, t, None),
    "koala": deepest_self_attention_pairs,
}


def init_map(
    student_keys: Iterable[str],
    student_config: Mapping[str, Any],
    teacher_config: Mapping[str, Any],
) -> dict[str, str]:
    """Student key -> teacher key for every student key (shapes are checked by the builder)."""
    return {k: teacher_key_for(k, student_config, teacher_config) for k in student_keys}


def _up_block_offset(student_config: Mapping[str, Any], teacher_config: Mapping[str, Any]) -> int:
    offset = len(teacher_config["up_block_types"]) - len(student_config["up_block_types"])
    if offset < 0:
        raise ValueError("the student has more stages than the teacher")
    return offset


def _layers_in_block(config: Mapping[str, Any], kind: str, block: int) -> int:
    """Layers (resnets) in one block: `layers_per_block`, plus one in up blocks."""
    layers = config["layers_per_block"]
    if isinstance(layers, list | tuple):
        # diffusers reverses per-block layer counts for the up path
        per_block = list(layers) if kind == "down_blocks" else list(reversed(layers))
        count = per_block[block]
    else:
        count = max_layers_per_block(config)
    return count + 1 if kind == "up_blocks" else count
