"""The loss registry, the recipe's loss blocks, and the weighted total.

Each stage of a recipe maps loss names to blocks (`losses: {task: {weight: 1.0}, ...}`); a block is
validated by its loss's own `Options` schema, so an unknown option or a wrong type is one line
naming `stages.N.losses.<name>.<option>`. A zero weight switches a loss off. Each loss returns raw,
unweighted terms, which the trainer logs one by one: BK-SDM's issue #21 was a feature term that
dwarfed the others unseen.

Adding a loss: a module with a `Loss` subclass, and one line in `LOSSES` below (or
`register_loss(MyLoss)` from outside the package).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model
from torch import Tensor

from core.errors import UserInputError
from distill.losses.attention_relation import AttentionRelationLoss
from distill.losses.base import Loss, LossOptions
from distill.losses.feature_kd import FeatureKDLoss
from distill.losses.output_kd import OutputKDLoss
from distill.losses.similarity import SimilarityMatchingLoss
from distill.losses.task import TaskLoss

LOSSES: dict[str, type[Loss]] = {
    loss.name: loss
    for loss in (
        TaskLoss,
        OutputKDLoss,
        FeatureKDLoss,
        SimilarityMatchingLoss,
        AttentionRelationLoss,
    )
}


def register_loss(loss: type[Loss]) -> type[Loss]:
    """Make `loss` available to recipes under `loss.name` (usable as a class decorator)."""
    existing = LOSSES.get(loss.name)
    if existing is not None and existing is not loss:
        raise ValueError(f"a loss named {loss.name!r} is already registered ({existing.__name__})")
    LOSSES[loss.name] = loss
    return loss


def validate_loss_blocks(blocks: Any) -> dict[str, LossOptions]:
    """Raw recipe blocks → each loss's validated `Options`, in the recipe's order.

    Raises ValueError for an unknown loss name or no active loss, and pydantic's ValidationError
    (located at `<name>.<option>`) for a bad option.
    """
    if not isinstance(blocks, Mapping):
        raise ValueError("losses must map loss names to blocks, e.g. {task: {weight: 1.0}}")
    unknown = [name for name in blocks if name not in LOSSES]
    if unknown:
        raise ValueError(f"unknown loss {unknown[0]!r}; valid losses: {', '.join(LOSSES)}")
    names = tuple(blocks)
    schema = _blocks_schema(tuple((name, LOSSES[name].Options) for name in names))
    validated = schema.model_validate({name: blocks[name] or {} for name in names})
    options = {name: getattr(validated, name) for name in names}
    if not any(block.weight for block in options.values()):
        raise ValueError("every loss weight is zero; give at least one loss a weight > 0")
    return options


@lru_cache(maxsize=64)
def _blocks_schema(fields: tuple[tuple[str, type[LossOptions]], ...]) -> type[BaseModel]:
    """A model with one field per named loss, so pydantic locates errors as `<loss>.<option>`."""
    return create_model(
        "LossBlocks",
        __config__=ConfigDict(extra="forbid"),
        **{name: (options, ...) for name, options in fields},
    )


def active(blocks: Mapping[str, LossOptions]) -> dict[str, LossOptions]:
    """The blocks with a non-zero weight."""
    return {name: block for name, block in blocks.items() if block.weight != 0}


def reads_teacher(blocks: Mapping[str, LossOptions]) -> bool:
    """Whether any active loss compares against the teacher."""
    return any(LOSSES[name].reads_teacher for name in active(blocks))


def build_losses(
    blocks: Mapping[str, LossOptions],
    student_config: Mapping[str, Any],
    teacher_config: Mapping[str, Any] | None,
) -> list[Loss]:
    """One module per active block, in recipe order; default layer pairs follow the two configs.

    A loss that fails to build (no pairs, say) raises UserInputError naming `losses.<name>`.
    """
    losses = []
    for name, block in active(blocks).items():
        try:
            losses.append(LOSSES[name].from_options(block, student_config, teacher_config or {}))
        except UserInputError as error:
            raise UserInputError(f"losses.{name}: {error}") from None
    return losses


def weighted_total(terms: Mapping[str, Tensor], losses: Sequence[Loss]) -> Tensor:
    """Σ weight·term over the losses; a loss whose term is missing is a wiring error."""
    missing = [loss.name for loss in losses if loss.name not in terms]
    if missing:
        computed = ", ".join(terms) or "none"
        raise KeyError(f"loss terms not computed: {', '.join(missing)} (computed: {computed})")
    if not losses:
        raise ValueError("no loss to weigh")
    return sum(loss.weight * terms[loss.name] for loss in losses)
