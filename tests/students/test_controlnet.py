"""A ControlNet for every student variant: built from the student (mid-block-less ones too),
trained one step with a conditioning image, reloaded into StableDiffusionControlNetPipeline with
plain diffusers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

from cli import main
from students import build_student
from students.controlnet import controlnet_from_student
from testkit.tiny_world import make_tiny_pipeline


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("teacher") / "teacher", seed=1)


@pytest.mark.parametrize(
    ("variant", "mid_block"), [("base", "student"), ("small", "teacher"), ("tiny", "teacher")]
)
def test_every_variant_gets_a_controlnet(
    teacher_folder: Path, variant: str, mid_block: str
) -> None:
    teacher = StableDiffusionPipeline.from_pretrained(teacher_folder).unet
    student, _ = build_student(teacher, variant)
    with pytest.raises(ValueError, match="mid_block_type"):  # what users hit (BK-SDM #64)
        if student.mid_block is None:
            ControlNetModel.from_unet(student)
        else:
            raise ValueError("mid_block_type: base has one, from_unet works")
    controlnet, init = controlnet_from_student(student, teacher)
    assert init.mid_block == mid_block
    assert len(controlnet.down_blocks) == len(student.down_blocks)
    for ours, theirs in zip(controlnet.down_blocks, student.down_blocks, strict=True):
        for key, value in theirs.state_dict().items():  # from_unet's copy of the encoder
            assert torch.equal(ours.state_dict()[key], value), key
    if mid_block == "teacher":
        for key, value in teacher.mid_block.state_dict().items():
            assert torch.equal(controlnet.mid_block.state_dict()[key], value), key
    fresh, why = controlnet_from_student(student, None)
    assert why.mid_block == ("student" if variant == "base" else "fresh")


def test_a_small_students_controlnet_trains_a_step_and_loads_in_plain_diffusers(
    teacher_folder: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    pipeline = StableDiffusionPipeline.from_pretrained(teacher_folder)
    student, _ = build_student(pipeline.unet, "small")
    student_folder = tmp_path / "student_unet"
    student.save_pretrained(student_folder)
    out = tmp_path / "controlnet"
    command = ["controlnet-init", str(student_folder), str(out), "--teacher", str(teacher_folder)]
    assert main([*command, "--vae-scale-factor", "4"]) == 0  # the tiny VAE: 32 px -> 8x8
    controlnet = ControlNetModel.from_pretrained(out)

    # One training step, as diffusers' train_controlnet.py takes it: the student frozen, the
    # ControlNet's residuals added to its down and mid outputs, MSE to the noise.
    latents = torch.randn(2, 4, 8, 8)
    noise, timesteps = torch.randn_like(latents), torch.tensor([10, 500])
    noisy = pipeline.scheduler.add_noise(latents, noise, timesteps)
    text = pipeline.text_encoder(
        pipeline.tokenizer(
            ["a photo of a bag"] * 2, padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
    )[0]
    condition = torch.rand(2, 3, 32, 32)  # a conditioning image at the pixel size
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in controlnet.state_dict().items()}
    down, mid = controlnet(noisy, timesteps, text, controlnet_cond=condition, return_dict=False)
    student.requires_grad_(False)
    prediction = student(
        noisy,
        timesteps,
        text,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
    ).sample
    loss = F.mse_loss(prediction, noise)
    loss.backward()
    optimizer.step()
    changed = [k for k, v in controlnet.state_dict().items() if not torch.equal(v, before[k])]
    assert any("controlnet_down_blocks" in k for k in changed)  # the zero convolutions learn
    assert any("controlnet_mid_block" in k for k in changed)
    controlnet.save_pretrained(tmp_path / "trained")

    loaded = StableDiffusionControlNetPipeline(
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        unet=type(student).from_pretrained(student_folder),
        controlnet=ControlNetModel.from_pretrained(tmp_path / "trained"),
        scheduler=pipeline.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    loaded.set_progress_bar_config(disable=True)
    edges = Image.fromarray(
        (np.random.default_rng(0).random((32, 32)) > 0.5).astype(np.uint8) * 255
    )
    image = loaded(
        "a photo of a bag",
        image=edges.convert("RGB"),
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32) and np.asarray(image).std() > 0
