"""Named evaluation protocols: every setting a published comparison depends on, as data.

`bk-sdm-coco30k` is BK-SDM's zero-shot MS-COCO protocol (Kim et al. 2023, arXiv:2305.15798; their
`src/generate.py`, `scripts/eval_scores.sh`, `src/get_stat_mscoco_val2014.py`): 30K val2014
captions, 512 px with 25 PNDM steps at guidance 7.5, saved resized to 256 px; FID against all
40,504 val2014 images resized to 256×256; IS over 10 splits; CLIP score with open_clip ViT-g-14
(laion2b_s34b_b88k). Their published numbers come along as reference rows for the report.

Known differences from their scripts: they seeded one generator (1234) for the whole run, we seed
each image (base_seed + i) so runs resume and batch freely; their FID used pytorch-fid's resize,
ours torch-fidelity's TF1-compatible one (same network); their IS used torch-fidelity directly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from core.errors import UserInputError
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
        """The `evaluate(...)` keyword arguments this protocol fixes."""
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


def get_protocol(name: str) -> EvalProtocol:
    if name not in PROTOCOLS:
        raise UserInputError(f"unknown evaluation protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
