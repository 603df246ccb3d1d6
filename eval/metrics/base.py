"""What a metric is: the inputs it declares, the columns it fills, the results it returns.

`evaluate` runs generate → features → metrics. For each row (a model at a step count) it
generates the images, computes what the active metrics declared they need once (the Inception
pass serves FID, the fidelity FID and IS alike), then asks every metric for its results:

    class MyMetric(Metric):
        key = "my_metric"
        columns = (Column("my_metric", "my metric ↑", lambda v: f"{v:.3f}"),)
        needs = frozenset({Need.IMAGES, Need.PROMPTS})

        def score(self, row: Row, context: EvalContext) -> dict[str, MetricResult]:
            return {"my_metric": MetricResult(value, n=len(row.images.paths), detail="how")}

and one line in `eval.metrics.registry.BUILTIN` (or an entry point in the
`sd_distill.metrics` group, for a metric that lives in another package).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from core.errors import UserInputError
from eval.fid import DEFAULT_MAX_BOOTSTRAP_IMAGES
from eval.fid_bootstrap import DEFAULT_RESAMPLES
from eval.generate import GeneratedImages, GenerationSettings
from eval.inception import PREPROCESSINGS
from eval.results import MetricResult


class Need(enum.Enum):
    """An input a metric reads. `evaluate` computes the costly ones (the Inception pass, the
    reference statistics, the teacher's row) once, and only when some metric asks; the images,
    prompts and pipeline are every row's anyway (declared for the reader)."""

    IMAGES = "images"  # the row's image files
    PROMPTS = "prompts"  # prompt i of image i
    INCEPTION = "inception"  # pool3 features of the row's images, (n, 2048)
    INCEPTION_LOGITS = "inception_logits"  # the classifier head's logits, (n, 1008), if any
    REFERENCE = "reference"  # the FID reference's statistics
    TEACHER = "teacher"  # the teacher's row (same prompts and seeds)
    PIPELINE = "pipeline"  # the loaded pipeline (size and speed)


@dataclass(frozen=True)
class Column:
    """One report column. An `optional` column is shown only when some row has its metric (the
    fidelity FID needs a teacher, the in-domain metrics Fashion-MNIST prompts)."""

    key: str
    header: str
    format: Callable[[float], str]
    optional: bool = False


@dataclass
class Features:
    """One pass of the FID Inception network over a row's images, in image order."""

    pool3: torch.Tensor | None = None  # (n, 2048) float32, CPU
    logits: torch.Tensor | None = None  # (n, 1008) float32, CPU: only where the head exists
    missing: MetricResult | None = None  # why there are no features (no Inception weights)
    logits_missing: MetricResult | None = None  # why there are no logits (no classifier head)
    preprocessing: str = ""  # how images reached the network (torch-fidelity's or pytorch-fid's)


@dataclass
class Row:
    """One row of the report: `name` ("teacher", "student", "student, 4 steps"), its images and
    what was computed from them. `pipeline` is loaded only while the row is scored."""

    name: str
    images: GeneratedImages
    pipeline: Any = None
    features: Features = field(default_factory=Features)


@dataclass(frozen=True)
class EvalOptions:
    """The metric settings of `evaluate` that are not about generation (those are
    `GenerationSettings`); each metric reads the ones it needs."""

    reference: str | Path | Any | None = None
    reference_resize: int | None = None
    image_column: str = "image"
    clip_model: str | Any | None = None
    inception_score_splits: int = 10
    inception_weights: str | Path | None = None
    allow_download: bool = True
    fid_preprocessing: str = "torch-fidelity"  # or "pytorch-fid" (BK-SDM's)
    bootstrap_resamples: int = DEFAULT_RESAMPLES
    max_bootstrap_images: int = DEFAULT_MAX_BOOTSTRAP_IMAGES
    speed_warmup: int = 1
    speed_repeats: int = 5
    cache_dir: str | Path | None = None
    plugins: Mapping[str, Any] = field(default_factory=dict)  # a plugin metric's own settings

    def __post_init__(self) -> None:
        if self.fid_preprocessing not in PREPROCESSINGS:
            raise UserInputError(
                f"unknown FID preprocessing {self.fid_preprocessing!r}; choose "
                + ", ".join(PREPROCESSINGS)
            )


@dataclass
class EvalContext:
    """What is shared by every row of one evaluation: the prompts, how the images are made, and
    the metrics' settings (`options.plugins` holds a plugin metric's own, by its key)."""

    prompts: list[str]
    generation: GenerationSettings
    device: torch.device
    options: EvalOptions
    progress: bool = True
    has_teacher: bool = False
    teacher: Row | None = None  # set once the teacher's row is scored
    reference: Any = None  # FIDStatistics, when a reference was given and Inception loaded
    reference_missing: MetricResult | None = None  # why there is no reference

    @property
    def seeds_text(self) -> str:
        n, seed = len(self.prompts), self.generation.seed
        if self.generation.seeding == "one-generator":
            return f"one generator seeded {seed}, images in prompt order"
        return f"seeds {seed}..{seed + n - 1} (prompt i: seed {seed}+i)"


class Metric:
    """A metric of one row. Subclasses set `key`, `columns`, `needs` and implement `score`;
    `prepare` loads what all rows share (a CLIP model) and raises `MetricUnavailable` when the
    metric cannot run here: each of its cells then says why."""

    key: ClassVar[str]
    columns: ClassVar[tuple[Column, ...]]
    needs: ClassVar[frozenset[Need]] = frozenset({Need.IMAGES})
    per_image: ClassVar[bool] = True  # computed from the images: details name their seeds

    def applies(self, context: EvalContext) -> bool:
        """False: the metric has no column in this evaluation (a teacher-only metric without a
        teacher, an in-domain metric for out-of-domain prompts)."""
        return Need.TEACHER not in self.needs or context.has_teacher

    def prepare(self, context: EvalContext) -> None:
        """Load what every row shares; raise `MetricUnavailable` when it cannot run."""

    def score(self, row: Row, context: EvalContext) -> dict[str, MetricResult]:
        raise NotImplementedError

    def compare(self, rows: Sequence[Row], context: EvalContext) -> dict[str, MetricResult]:
        """Results about two rows at once (the student-minus-teacher FID), after all rows."""
        return {}

    def settings(self) -> dict[str, Any]:
        """What this metric adds to metrics.json's settings (its judge, its CLIP model)."""
        return {}

    def notes(self, context: EvalContext) -> list[str]:
        """Paragraphs under the report's table."""
        return []

    def unavailable(self, reason: str, detail: str = "") -> dict[str, MetricResult]:
        """Every column of this metric as n/a with `reason`."""
        return {column.key: MetricResult.missing(reason, detail) for column in self.columns}
