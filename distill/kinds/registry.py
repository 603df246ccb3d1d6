"""The stage-kind registry: recipe `kind:` names to `StageKind` classes.

Builtin kinds are listed in `STAGE_KINDS`; another package registers its own with an entry point
(the offline world's `autoencoder` kind does):

    [project.entry-points."sd_distill.stage_kinds"]
    my_kind = "my_package.my_module:MyKind"

or at run time with `register_stage_kind(MyKind)`.
"""

from __future__ import annotations

from typing import Any

from core import plugins
from distill.kinds.base import KindOptions, StageKind
from distill.kinds.consistency import ConsistencyKind
from distill.kinds.distill import DistillKind

DEFAULT_KIND = DistillKind.name
STAGE_KINDS: dict[str, type[StageKind]] = {
    kind.name: kind for kind in (DistillKind, ConsistencyKind)
}


def register_stage_kind(kind: type[StageKind]) -> type[StageKind]:
    """Make `kind` available to recipes as `kind: <kind.name>` (usable as a class decorator)."""
    existing = STAGE_KINDS.get(kind.name)
    if existing is not None and existing is not kind:
        raise ValueError(f"a stage kind named {kind.name!r} is already registered ({existing})")
    STAGE_KINDS[kind.name] = kind
    return kind


def stage_kind(name: str) -> type[StageKind]:
    """The kind registered under `name`, looking in the entry points the first time; ValueError
    (one line, with the known names) for an unknown one."""
    if name not in STAGE_KINDS:
        found = plugins.load(plugins.STAGE_KINDS, name)
        if found is not None:
            register_stage_kind(found)
    if name not in STAGE_KINDS:
        known = sorted({*STAGE_KINDS, *plugins.registered(plugins.STAGE_KINDS)})
        raise ValueError(f"unknown stage kind {name!r}; known: {', '.join(known)}")
    return STAGE_KINDS[name]


def validate_kind_options(name: str, options: Any) -> KindOptions:
    """A stage's raw `options:` block → its kind's validated `Options` (pydantic's
    ValidationError, located at the option, for a bad one)."""
    if isinstance(options, KindOptions):
        return options
    return stage_kind(name).Options.model_validate(options or {})
