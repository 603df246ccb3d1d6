"""Each family's conditioning equals what its diffusers pipeline feeds the UNet, and families
register like losses."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from core.errors import UserInputError
from core.families import (
    FAMILIES,
    StableDiffusion,
    family_for,
    family_named,
    register_family,
)
from offline.teacher import TeacherSettings, untrained_pipeline

PROMPTS = ["a photo of a dress", "", "a picture of an ankle boot, product photo"]
TOY = {"vae_channels": (8, 16, 16), "unet_channels": (16, 32, 32), "text_hidden_size": 16}


def _pipeline(**settings):
    pipeline = untrained_pipeline(TeacherSettings(**TOY, **settings))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("mask", [False, True], ids=["SD v1 (no mask)", "masked encoder"])
def test_sd_conditioning_equals_the_pipelines_encode_prompt(mask: bool) -> None:
    pipeline = _pipeline()
    pipeline.text_encoder.config.use_attention_mask = mask
    family = family_named("sd")
    conditioning = family.conditioning(pipeline, encoders=True)
    ours = conditioning.encode(conditioning.caption_fields(PROMPTS))
    theirs, _ = pipeline.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
    assert set(ours) == {"encoder_hidden_states"}
    assert torch.equal(ours["encoder_hidden_states"], theirs)


def test_sdxl_conditioning_equals_the_pipelines_encode_prompt_and_time_ids() -> None:
    pipeline = _pipeline(
        family="sdxl", plain_stage="first", use_linear_projection=True, transformer_layers=(1, 1, 2)
    )
    family = family_named("sdxl")
    conditioning = family.conditioning(pipeline, encoders=True)
    fields = conditioning.caption_fields(PROMPTS)
    size_ids = conditioning.sample_fields((28, 28), (0, 0), 32)["time_ids"]  # (6,)
    ours = conditioning.encode(fields | {"time_ids": size_ids.expand(len(PROMPTS), -1)})
    embeds, _, pooled, _ = pipeline.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    assert torch.equal(ours["encoder_hidden_states"], embeds)
    assert torch.equal(ours["added_cond_kwargs"]["text_embeds"], pooled)
    time_ids = pipeline._get_add_time_ids(
        (28, 28),
        (0, 0),
        (32, 32),
        dtype=embeds.dtype,
        text_encoder_projection_dim=pipeline.text_encoder_2.config.projection_dim,
    )  # (1, 6), as the pipeline builds them
    assert torch.equal(ours["added_cond_kwargs"]["time_ids"][0], time_ids[0])


def test_a_family_from_outside_the_package_is_resolved_once_registered() -> None:
    class WideTextSD(StableDiffusion):
        """A made-up family: SD pipelines whose UNet reads 999-wide text states."""

        name: ClassVar[str] = "wide-sd"

        def handles(self, pipeline_class, unet_config) -> bool:
            return unet_config.get("cross_attention_dim") == 999

    with pytest.raises(UserInputError, match="unknown model family 'wide-sd'"):
        family_named("wide-sd")
    register_family(WideTextSD)
    try:
        assert family_named("wide-sd").name == "wide-sd"
        assert family_for(None, {"cross_attention_dim": 999}).name == "wide-sd"
        assert family_for(None, {"cross_attention_dim": 768}).name == "sd"
    finally:
        del FAMILIES["wide-sd"]
