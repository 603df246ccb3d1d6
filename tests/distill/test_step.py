"""The step: one pure noising function, and every registered loss through taps and both models."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from distill.losses import LOSSES, build_losses, validate_loss_blocks
from distill.preflight import check_loss_shapes
from distill.step import distillation_losses, noise_batch
from distill.teacher import FrozenTeacher
from students import build_student
from testkit.unets import make_tiny_sd_v1_4

SCHEDULER = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _cached(batch: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "latent_mean": torch.randn(batch, 4, 8, 8, generator=generator),
        "latent_std": torch.rand(batch, 4, 8, 8, generator=generator) * 0.1,
        "conditioning": {"encoder_hidden_states": torch.randn(batch, 7, 32, generator=generator)},
        "unconditional": {"encoder_hidden_states": torch.zeros(7, 32)},
    }


def _noised(cached: dict, positions: list[int], uncond_prob: float = 0.5):
    return noise_batch(
        cached["latent_mean"],
        cached["latent_std"],
        cached["conditioning"],
        cached["unconditional"],
        [torch.Generator().manual_seed(p) for p in positions],
        scheduler=SCHEDULER,
        scaling_factor=0.5,
        uncond_prob=uncond_prob,
    )


def test_a_sample_is_noised_the_same_whatever_batch_it_is_in() -> None:
    cached = _cached(4)
    whole = _noised(cached, [10, 11, 12, 13])
    halves = [
        _noised({**cached, **_slice(cached, part)}, positions)
        for part, positions in ((slice(0, 2), [10, 11]), (slice(2, 4), [12, 13]))
    ]
    for field in ("noisy", "timesteps", "target"):
        joined = torch.cat([getattr(half, field) for half in halves])
        assert torch.equal(getattr(whole, field), joined), field
    hidden = "encoder_hidden_states"
    joined = torch.cat([half.conditioning[hidden] for half in halves])
    assert torch.equal(whole.conditioning[hidden], joined)


def _slice(cached: dict, part: slice) -> dict:
    return {
        "latent_mean": cached["latent_mean"][part],
        "latent_std": cached["latent_std"][part],
        "conditioning": {k: v[part] for k, v in cached["conditioning"].items()},
    }


def test_dropped_samples_get_the_empty_prompt_and_the_rest_keep_theirs() -> None:
    cached = _cached(64)
    batch = _noised(cached, list(range(64)), uncond_prob=0.5)
    hidden = batch.conditioning["encoder_hidden_states"]
    dropped = (hidden == 0).flatten(1).all(1)
    kept = torch.isclose(hidden, cached["conditioning"]["encoder_hidden_states"]).flatten(1).all(1)
    assert torch.equal(dropped, ~kept)
    assert 16 < int(dropped.sum()) < 48  # about half, from per-sample draws
    assert (
        not _noised(cached, list(range(64)), uncond_prob=0.0)
        .conditioning["encoder_hidden_states"]
        .eq(0)
        .flatten(1)
        .all(1)
        .any()
    )


def test_noising_follows_the_scheduler_forward_process() -> None:
    cached = _cached(3)
    batch = _noised(cached, [0, 1, 2])
    # noisy = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε and the ε target: x0 recovered from both must be the
    # scaled posterior sample, which lies within a few std of the scaled mean.
    alpha_bar = SCHEDULER.alphas_cumprod[batch.timesteps].reshape(-1, 1, 1, 1)
    x0 = (batch.noisy - (1 - alpha_bar).sqrt() * batch.target) / alpha_bar.sqrt()
    deviation = (x0 / 0.5 - cached["latent_mean"]) / cached["latent_std"]
    assert deviation.abs().max() < 6


@pytest.mark.parametrize("variant", ["base", "small", "tiny"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_runs_through_the_taps_and_trains_only_the_student(name, variant) -> None:
    teacher_unet = make_tiny_sd_v1_4(seed=0)
    student, _ = build_student(teacher_unet, variant)
    teacher = FrozenTeacher(teacher_unet)
    losses = build_losses(validate_loss_blocks({name: {}}), student.config, teacher.config)
    check_loss_shapes(losses, student.config, teacher.config)  # the preflight agrees
    batch = _noised(_cached(2), [0, 1])

    total, terms = distillation_losses(student, teacher, batch, losses)
    assert {key.split("/")[0] for key in terms} == {name}
    assert torch.isfinite(total) and total.item() > 0
    pair_terms = [term for key, term in terms.items() if "/" in key]
    if losses[0].tapped_paths()[0]:  # a feature loss logs each pair, and they add up to its term
        assert len(pair_terms) == len(losses[0].layer_pairs)
        torch.testing.assert_close(sum(pair_terms), terms[name])
    total.backward()
    assert student.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
