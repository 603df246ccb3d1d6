"""What a row costs: UNet parameters and GFLOPs, UNet evaluations per image, and the median
latency of one UNet step and of one whole image, at the row's generation settings."""

from __future__ import annotations

from eval.metrics.base import Column, EvalContext, Metric, Need, Row
from eval.results import MetricResult
from eval.speed import (
    model_size,
    pipeline_latency,
    unet_evaluations,
    unet_step_latency,
    uses_classifier_free_guidance,
)


class Cost(Metric):
    key = "cost"
    columns = (
        Column("params", "UNet params", lambda v: f"{v / 1e6:.4g}M"),
        Column("gflops", "GFLOPs", lambda v: f"{v:.4g}"),
        Column("unet_evals", "UNet evals / image", lambda v: f"{v:.0f}", optional=True),
        Column("unet_latency", "UNet s/step", lambda v: f"{v:.4f}"),
        Column("pipeline_latency", "pipeline s/image", lambda v: f"{v:.3f}"),
    )
    needs = frozenset({Need.PIPELINE})
    per_image = False

    def score(self, row: Row, context: EvalContext) -> dict[str, MetricResult]:
        pipeline, settings = row.pipeline, row.images.settings
        seed = context.generation.seed
        repeats = {
            "warmup": context.options.speed_warmup,
            "repeats": context.options.speed_repeats,
        }
        results = dict(model_size(pipeline.unet))
        results["unet_evals"] = unet_evaluations(pipeline, settings)
        results["unet_latency"] = unet_step_latency(
            pipeline.unet,
            batch_size=2 if uses_classifier_free_guidance(pipeline, settings) else 1,
            sample_size=settings["height"] // pipeline.vae_scale_factor,
            seed=seed,
            **repeats,
        )
        results["pipeline_latency"] = pipeline_latency(
            pipeline,
            row.images.prompts[0],
            num_inference_steps=settings["num_inference_steps"],
            guidance_scale=settings["guidance_scale"],
            height=settings["height"],
            width=settings["width"],
            scheduler=settings["scheduler"],
            seed=seed,
            **repeats,
        )
        return results
