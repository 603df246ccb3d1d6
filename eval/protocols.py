"""Named evaluation protocols: every setting a published comparison depends on, as data.

`bk-sdm-coco30k` is BK-SDM's zero-shot MS-COCO protocol (Kim et al. 2023, arXiv:2305.15798; their
`src/generate.py`, `scripts/eval_scores.sh`, `src/get_stat_mscoco_val2014.py`): 30K val2014
captions, 512 px with 25 PNDM steps at guidance 7.5, saved resized to 256 px; FID against all
40,504 val2014 images resized to 256×256; IS over 10 splits; CLIP score with open_clip ViT-g-14
(laion2b_s34b_b88k). Their published numbers come along as reference rows for the report.

By default three things differ from their scripts, each for a reason: they seeded one generator
(1234) for the whole run, we seed each image (seed + i) so images batch freely and any subset can
be regenerated alone; they saved JPEGs, we save PNGs (JPEG loses detail that FID sees); their FID
used pytorch-fid's resize, ours torch-fidelity's TF1-compatible one (same network). `--parity
bk-sdm` (`PARITIES`) does all three their way, for a number comparable to their table at the
0.1-FID level; their IS (torch-fidelity's network and preprocessing) and CLIP (mean cosine,
open_clip) are ours already.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from core.errors import UserInputError
from eval.generate import GenerationSettings
from eval.metrics.base import EvalOptions
from eval.report import ReportRow
from eval.results import MetricResult

BK_SDM_CITATION = "Kim et al. 2023, BK-SDM (arXiv:2305.15798), zero-shot MS-COCO 256px, 30K"


@dataclass(frozen=True)
class PublishedResult:
    """Numbers a paper reports under a protocol, shown as a reference row."""

    name: str
    fid: float
    inception_score: float
    clip: float
    source: str
    num_images: int

    def as_report_row(self) -> ReportRow:
        published = lambda value: MetricResult(value, self.num_images, f"published: {self.source}")
        metrics = {"fid": published(self.fid), "is": published(self.inception_score)}
        metrics["clip"] = published(self.clip)
        return ReportRow(name=f"{self.name} (published)", metrics=metrics, source=self.source)


@dataclass(frozen=True)
class EvalProtocol:
    """The generation and metric settings of one evaluation; `evaluate_kwargs()` feeds
    `eval.evaluate.evaluate`. `reference` is described, not stored: it is local data."""

    name: str
    prompts: str
    num_images: int
    num_inference_steps: int
    guidance_scale: float
    height: int | None
    width: int | None
    output_size: int | None
    scheduler: str
    seed: int
    clip_model: str | None
    reference_resize: int | None
    inception_score_splits: int
    reference_description: str
    published: tuple[PublishedResult, ...] = field(default=())
    # The student's step counts, one row each (the teacher at num_inference_steps); None: one.
    student_steps: tuple[int, ...] | None = None

    def evaluate_kwargs(self) -> dict[str, Any]:
        """The settings this protocol fixes, flat (`evaluate_arguments` makes them `evaluate`'s
        arguments; explicit flags override single ones first)."""
        settings = asdict(self)
        for not_an_argument in ("name", "reference_description", "published"):
            settings.pop(not_an_argument)
        settings["published"] = self.published
        return settings


BK_SDM_COCO30K = EvalProtocol(
    name="bk-sdm-coco30k",
    prompts="coco30k",
    num_images=30_000,
    num_inference_steps=25,
    guidance_scale=7.5,
    height=512,
    width=512,
    output_size=256,
    scheduler="pndm",
    seed=1234,
    clip_model="open_clip:ViT-g-14:laion2b_s34b_b88k",
    reference_resize=256,
    inception_score_splits=10,
    reference_description="MS-COCO val2014 images (all 40,504), resized to 256x256",
    published=(
        PublishedResult("SD v1.4", 13.05, 36.76, 0.2958, BK_SDM_CITATION, 30_000),
        PublishedResult("BK-SDM-Base", 15.76, 33.79, 0.2878, BK_SDM_CITATION, 30_000),
    ),
)

FASHION = EvalProtocol(
    name="fashion",
    prompts="fashion",
    num_images=100,
    num_inference_steps=25,
    guidance_scale=7.5,
    height=None,
    width=None,
    output_size=None,
    scheduler="pndm",
    seed=0,
    clip_model=None,
    reference_resize=None,
    inception_score_splits=10,
    reference_description="Fashion-MNIST test images at the model's resolution",
)

PROTOCOLS = {protocol.name: protocol for protocol in (BK_SDM_COCO30K, FASHION)}


@dataclass(frozen=True)
class Parity:
    """How a published codebase generated and scored its images, where that differs from the
    project's defaults (`distill eval --parity NAME`)."""

    name: str
    seeding: str  # eval.generate.SEEDINGS
    batch_size: int
    image_format: str  # eval.generate.IMAGE_FORMATS
    fid_preprocessing: str  # eval.inception.PREPROCESSINGS
    source: str

    def apply(
        self, generation: GenerationSettings, options: EvalOptions
    ) -> tuple[GenerationSettings, EvalOptions]:
        generation = replace(
            generation,
            seeding=self.seeding,
            batch_size=self.batch_size,
            image_format=self.image_format,
        )
        return generation, replace(options, fid_preprocessing=self.fid_preprocessing)


BK_SDM_PARITY = Parity(
    name="bk-sdm",
    seeding="one-generator",
    batch_size=1,
    image_format="jpeg",
    fid_preprocessing="pytorch-fid",
    source="BK-SDM src/generate.py (one generator, batch 1, .jpg, Image.resize), "
    "scripts/eval_scores.sh (pytorch-fid)",
)
PARITIES = {parity.name: parity for parity in (BK_SDM_PARITY,)}
_GENERATION_FIELDS = {f.name for f in fields(GenerationSettings)}
_OPTION_FIELDS = {f.name for f in fields(EvalOptions)}


def evaluate_arguments(settings: Mapping[str, Any], parity: str | None = None) -> dict[str, Any]:
    """Flat settings (a protocol's `evaluate_kwargs()`, flags on top) → `evaluate`'s arguments:
    the generation settings and the metric options as their objects, the rest as they are;
    `parity` (a `PARITIES` name) then replaces what that codebase did differently."""
    pick = lambda names: {k: v for k, v in settings.items() if k in names}
    generation = GenerationSettings(**pick(_GENERATION_FIELDS))
    options = EvalOptions(**pick(_OPTION_FIELDS))
    if parity is not None:
        if parity not in PARITIES:
            raise UserInputError(f"unknown parity {parity!r}; known: {', '.join(PARITIES)}")
        generation, options = PARITIES[parity].apply(generation, options)
    rest = {k: v for k, v in settings.items() if k not in _GENERATION_FIELDS | _OPTION_FIELDS}
    return {**rest, "generation": generation, "options": options}


def get_protocol(name: str) -> EvalProtocol:
    if name not in PROTOCOLS:
        raise UserInputError(f"unknown evaluation protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
