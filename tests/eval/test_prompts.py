"""Prompt sets: files, COCO captions from a local file, class-balanced Fashion-MNIST captions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import UserInputError
from eval.prompts import COCO_CAPTIONS_ENV, coco_captions, load_prompts
from offline.fashion_mnist import FASHION_CLASSES


def test_prompt_file_skips_blank_lines_and_repeats_to_the_requested_count(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog  \n")
    assert load_prompts(path) == ["a cat", "a dog"]
    assert load_prompts(path, 5) == ["a cat", "a dog", "a cat", "a dog", "a cat"]


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_prompt_file_is_a_user_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text(content)
    with pytest.raises(UserInputError, match="has no prompts"):
        load_prompts(path)


def test_unreadable_prompt_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="cannot read prompts file"):
        load_prompts(tmp_path / "missing.txt")


def test_fashion_prompts_are_class_balanced_and_deterministic() -> None:
    prompts = load_prompts("fashion", 30, seed=0)
    assert prompts == load_prompts("fashion", 30, seed=0)
    for index, prompt in enumerate(prompts):  # class i at positions i, i + 10, ...
        assert FASHION_CLASSES[index % 10].lower() in prompt.lower()


def test_coco30k_without_captions_says_how_to_provide_them(monkeypatch) -> None:
    monkeypatch.delenv(COCO_CAPTIONS_ENV, raising=False)
    with pytest.raises(UserInputError, match=COCO_CAPTIONS_ENV):
        load_prompts("coco30k")


def test_coco_captions_from_bk_sdm_csv_and_coco_json(tmp_path: Path, monkeypatch) -> None:
    csv_file = tmp_path / "metadata.csv"
    csv_file.write_text('file_name,text\nCOCO_1.jpg,"A bus, on a road."\nCOCO_2.jpg,A cat.\n')
    monkeypatch.setenv(COCO_CAPTIONS_ENV, str(csv_file))
    assert load_prompts("coco30k", 2) == ["A bus, on a road.", "A cat."]
    with pytest.raises(UserInputError, match="fewer than 3"):
        load_prompts("coco30k", 3)

    annotations = [
        {"image_id": 9, "id": 5, "caption": "second image"},
        {"image_id": 4, "id": 7, "caption": "first image, later caption"},
        {"image_id": 4, "id": 3, "caption": "first image"},
    ]
    json_file = tmp_path / "captions_val2014.json"
    json_file.write_text(json.dumps({"annotations": annotations}))
    assert coco_captions(json_file) == ["first image", "second image"]
