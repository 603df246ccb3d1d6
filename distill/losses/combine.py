"""The loss registry and the weighted total.

Weights are per stage (a recipe maps loss name → weight); a zero weight switches a loss off, so
`build_losses` builds only the losses a stage uses. Each loss returns raw, unweighted terms, which
the trainer logs one by one: BK-SDM's issue #21 was a feature term that dwarfed the others unseen.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from torch import Tensor, nn

from distill.errors import UserInputError
from distill.losses.attention_relation import AttentionRelationLoss
from distill.losses.feature_kd import FeatureKDLoss
from distill.losses.output_kd import OutputKDLoss
from distill.losses.similarity import SimilarityMatchingLoss
from distill.losses.task import TaskLoss

LOSSES: dict[str, type[nn.Module]] = {
    loss.name: loss
    for loss in (
        TaskLoss,
        OutputKDLoss,
        FeatureKDLoss,
        SimilarityMatchingLoss,
        AttentionRelationLoss,
    )
}


def active_losses(weights: Mapping[str, float]) -> list[str]:
    """The names with a non-zero weight, in the given order; unknown names or negative weights
    raise UserInputError."""
    unknown = [name for name in weights if name not in LOSSES]
    if unknown:
        raise UserInputError(
            f"unknown loss {', '.join(map(repr, unknown))}; valid losses: {', '.join(LOSSES)}"
        )
    negative = [name for name, weight in weights.items() if weight < 0]
    if negative:
        raise UserInputError(f"loss weights must be >= 0, got negative for {', '.join(negative)}")
    return [name for name, weight in weights.items() if weight != 0]


def needs_teacher(weights: Mapping[str, float]) -> bool:
    """Whether any active loss compares against the teacher (anything but "task")."""
    return any(LOSSES[name].uses_teacher for name in active_losses(weights))


def needs_feature_taps(weights: Mapping[str, float]) -> bool:
    """Whether any active loss reads intermediate features (so both models need FeatureTaps)."""
    return any(LOSSES[name].uses_features for name in active_losses(weights))


def _accepted_options(loss: type[nn.Module]) -> set[str]:
    parameters = inspect.signature(loss.__init__).parameters
    return {name for name in parameters if name != "self"}


def build_losses(weights: Mapping[str, float], **options: object) -> list[nn.Module]:
    """One module per loss with a non-zero weight, in the order of `weights`.

    `options` are constructor arguments routed by name to every loss that takes them (e.g.
    `max_positions` reaches both "similarity" and "attention_relation", `relation_heads` only the
    latter). An option that no registered loss takes raises UserInputError; one that only an
    inactive loss takes is ignored, so a recipe can keep it while a stage switches the loss off.
    """
    names = active_losses(weights)
    if not names:
        raise UserInputError("no loss has a non-zero weight; give at least one a weight > 0")
    known_options = set().union(*(_accepted_options(loss) for loss in LOSSES.values()))
    unknown = sorted(set(options) - known_options)
    if unknown:
        raise UserInputError(
            f"unknown loss option {', '.join(map(repr, unknown))}; valid options: "
            f"{', '.join(sorted(known_options))}"
        )
    modules = []
    for name in names:
        accepted = _accepted_options(LOSSES[name])
        modules.append(LOSSES[name](**{k: v for k, v in options.items() if k in accepted}))
    return modules


def weighted_total(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Σ weight·term over the non-zero weights.

    A non-zero weight whose term was not computed is a wiring error (the loss never ran) and
    raises; a term without a weight is logged by the caller but adds nothing.
    """
    active = {name: weight for name, weight in weights.items() if weight != 0}
    missing = [name for name in active if name not in terms]
    if missing:
        raise KeyError(
            f"weighted terms not computed: {', '.join(missing)} "
            f"(computed: {', '.join(terms) or 'none'})"
        )
    if not active:
        raise ValueError("no term has a non-zero weight")
    return sum(weight * terms[name] for name, weight in active.items())
