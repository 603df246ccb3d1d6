"""CLIP score through the real torchmetrics path, with tiny random (seeded) CLIP models."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from core.errors import UserInputError
from eval.clip_score import clip_score, open_clip_backend

PROMPTS = ["a photo of a cat", "a photo of a Dress", "a red Bag on a table"]


def test_clip_score_is_the_mean_cosine_not_torchmetrics_hundredfold(
    tiny_clip, random_images, direct_cosines
) -> None:
    """torchmetrics reports 100 × cosine; our value must be the cosine itself (BK-SDM's 0-1
    scale), checked against embeddings taken straight from the transformers CLIPModel."""
    images = random_images(3)
    result = clip_score(images, PROMPTS, tiny_clip, batch_size=2, progress=False)
    cosines = direct_cosines(tiny_clip, images, PROMPTS)  # (3,)
    expected = cosines.mean().item()
    assert expected > 0.05  # clearly positive: torchmetrics' clamp at 0 cannot hide a wrong scale
    assert result.n == 3
    assert result.value == pytest.approx(expected, abs=1e-5)
    assert "tiny-random-clip" in result.detail


def test_clip_score_depends_on_the_prompt(tiny_clip, random_images) -> None:
    images = random_images(3)
    matched = clip_score(images, PROMPTS, tiny_clip, progress=False)
    shuffled = clip_score(images, PROMPTS[1:] + PROMPTS[:1], tiny_clip, progress=False)
    assert matched.value != pytest.approx(shuffled.value, abs=1e-6)


def test_clip_score_is_unavailable_when_no_weights_load(tmp_path: Path, random_images) -> None:
    images = random_images(1)
    empty_folder = tmp_path / "no-clip-here"
    empty_folder.mkdir()
    missing = clip_score(images, PROMPTS[:1], str(empty_folder), progress=False)
    assert missing.value is None
    assert missing.unavailable.startswith(f"cannot load CLIP model '{empty_folder}'")
    assert "no CLIP model given" in clip_score(images, PROMPTS[:1], None).unavailable


def test_clip_score_needs_one_prompt_per_image(tiny_clip, random_images) -> None:
    with pytest.raises(UserInputError, match="one prompt per image"):
        clip_score(random_images(2), PROMPTS, tiny_clip)


def test_unknown_open_clip_model_is_a_user_error(random_images) -> None:
    with pytest.raises(UserInputError, match="unknown open_clip model"):
        clip_score(random_images(1), PROMPTS[:1], "open_clip:No-Such-Model")


def test_open_clip_backend_scores_through_the_same_metric(tmp_path: Path, random_images) -> None:
    """BK-SDM's CLIP score uses open_clip; a tiny random open_clip model takes the same path."""

    vision = {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8}
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}
    config = {"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}
    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "tiny-test-clip.json")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-test-clip")
    tokenizer = open_clip.get_tokenizer("tiny-test-clip")
    backend = open_clip_backend(model, preprocess, tokenizer, "tiny-open-clip")

    images = random_images(3)
    result = clip_score(images, PROMPTS, backend, progress=False)
    with torch.no_grad():
        image_embeds = model.encode_image(torch.stack([preprocess(image) for image in images]))
        text_embeds = model.encode_text(tokenizer(PROMPTS))
    expected = F.cosine_similarity(image_embeds, text_embeds, dim=-1).mean().clamp(min=0).item()
    assert result.value == pytest.approx(expected, abs=1e-5)
