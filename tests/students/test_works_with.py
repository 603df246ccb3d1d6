"""A student in the tools users already run: LoRA adapters through peft, and the schedulers
diffusers offers. (ControlNet: test_controlnet.py; ONNX: tests/distill/test_export.py; the
few-step student under LCMScheduler: tests/distill/test_consistency.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from students import build_student
from testkit.tiny_world import make_tiny_pipeline

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' train_text_to_image_lora.py


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("teacher") / "teacher", seed=1)


def small_student_pipeline(teacher_folder: Path) -> StableDiffusionPipeline:
    """The `small` student (no mid block) with the teacher's other components."""
    teacher = StableDiffusionPipeline.from_pretrained(teacher_folder)
    torch.manual_seed(0)
    student, _ = build_student(teacher.unet, "small")
    pipeline = StableDiffusionPipeline(**{**teacher.components, "unet": student})
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def image(pipeline: StableDiffusionPipeline, seed: int = 0, **settings) -> np.ndarray:
    """(1, 32, 32, 3) in [0, 1], 8 steps from seed `seed`'s latents."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return pipeline(
            "a photo of a bag",
            latents=latents,
            output_type="np",
            **{"num_inference_steps": 8} | settings,
        ).images


def test_a_lora_on_a_small_student_trains_saves_and_loads_with_plain_diffusers(
    teacher_folder: Path, tmp_path: Path
) -> None:
    """peft's LoRA on the student's attention projections, as diffusers' LoRA script does: only
    the adapters learn; saved with `save_lora_weights`, loaded into a fresh student with
    `load_lora_weights`, it gives the trained pipeline's image."""
    pipeline = small_student_pipeline(teacher_folder)
    student = pipeline.unet
    student.requires_grad_(False)
    student.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in name for name in trainable)
    frozen = {n: p.clone() for n, p in student.named_parameters() if n not in trainable}
    plain = image(small_student_pipeline(teacher_folder))

    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    latents = torch.randn(2, 4, 8, 8)
    noise, timesteps = torch.randn_like(latents), torch.tensor([10, 500])
    ids = pipeline.tokenizer(
        ["a photo of a bag"] * 2, padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        text = pipeline.text_encoder(ids)[0]  # (2, 77, D)
    noisy = pipeline.scheduler.add_noise(latents, noise, timesteps)
    for _ in range(3):
        loss = F.mse_loss(student(noisy, timesteps, text).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)
    trained = image(pipeline)
    assert np.abs(trained - plain).max() > 1e-3  # the adapters changed the images

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(student))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers)
    fresh = small_student_pipeline(teacher_folder)
    fresh.load_lora_weights(tmp_path / "lora")
    np.testing.assert_allclose(image(fresh), trained, atol=1e-5)


def test_dpm_solver_samples_the_student_like_its_own_scheduler(teacher_folder: Path) -> None:
    """DPM-Solver++ from the student's scheduler config solves the same ODE as its PNDM: at 25
    steps the two images differ by 1.3% of the difference between two seeds' images (measured;
    bound 5%). A config that did not carry over would not: v-prediction measured 61%."""
    pipeline = small_student_pipeline(teacher_folder)
    own = image(pipeline, num_inference_steps=25)
    other_seed = image(pipeline, seed=1, num_inference_steps=25)
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    dpm = image(pipeline, num_inference_steps=25)
    assert np.abs(dpm - own).mean() < 0.05 * np.abs(other_seed - own).mean()
