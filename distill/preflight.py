"""Check every stage's losses against the real model shapes before anything trains.

A layer pair that names no module, or whose features cannot be paired (a 16×16 student map against
an 8×8 teacher map), would otherwise surface at the first step of its stage, hours into a run.
Here both UNets of every stage are built on the meta device from their configs (no weights, no
memory, about a second at SD scale), run once on meta inputs with the losses' taps, and each
feature loss checks the shapes of its pairs. Problems are one line naming the recipe key. The run
plan (`distill.plan`) calls this for every stage before anything is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from core.errors import UserInputError
from core.families import family_for, unet_from_config
from core.identity import stable_hash
from distill.losses import FeatureLoss, Loss
from distill.taps import FeatureTaps, resolve_module


def check_loss_shapes(
    losses: list[Loss], student_config: Mapping[str, Any], teacher_config: Mapping[str, Any]
) -> None:
    """Raise UserInputError `losses.<name>.layer_pairs.<i>: ...` for a pair that names no module
    or whose features cannot be paired; the models are meta-device copies of the configs."""
    feature_losses = [loss for loss in losses if isinstance(loss, FeatureLoss)]
    if not feature_losses:
        return
    pairs = [pair for loss in feature_losses for pair in loss.layer_pairs]
    student = _meta_feature_shapes(student_config, [s for s, _ in pairs])
    teacher = _meta_feature_shapes(teacher_config, [t for _, t in pairs])
    for loss in feature_losses:
        for position, (student_path, teacher_path) in enumerate(loss.layer_pairs):
            where = f"losses.{loss.name}.layer_pairs.{position}"
            student_shape, teacher_shape = student[student_path], teacher[teacher_path]
            for side, found in (("student", student_shape), ("teacher", teacher_shape)):
                if isinstance(found, str):
                    raise UserInputError(f"{where}: {side} {found}")
            try:
                loss.check_pair((student_path, teacher_path), student_shape, teacher_shape)
            except UserInputError as error:
                raise UserInputError(f"{where}: {error}") from None


_SHAPES: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}  # stages share UNet configs


def _meta_feature_shapes(config: Mapping[str, Any], paths: list[str]) -> dict[str, Any]:
    """path → output shape of that module in one meta forward at the config's native size, or a
    message (str) saying why the path cannot be tapped. Remembered per (config, paths)."""
    key = (stable_hash(dict(config)), tuple(dict.fromkeys(paths)))
    if key not in _SHAPES:
        _SHAPES[key] = _probe_shapes(config, list(key[1]))
    return dict(_SHAPES[key])


def _probe_shapes(config: Mapping[str, Any], paths: list[str]) -> dict[str, Any]:
    unet = unet_from_config(dict(config), device="meta")
    shapes: dict[str, Any] = {}
    tappable = []
    for path in dict.fromkeys(paths):
        try:
            resolve_module(unet, path)
            tappable.append(path)
        except UserInputError as error:
            shapes[path] = str(error)
    inputs = family_for(None, dict(config)).probe_inputs(config, device="meta")
    with torch.no_grad(), FeatureTaps(unet, tappable) as taps:
        unet(**inputs)
    for path in tappable:
        feature = taps.features.get(path)
        shapes[path] = (
            tuple(feature.shape)
            if feature is not None
            else f"module {path!r} does not run in the UNet's forward"
        )
    return shapes
