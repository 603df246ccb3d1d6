"""The offline world: CLIP tokenizer, Fashion-MNIST captions, the tiny SD teacher recipe."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from core.errors import UserInputError
from distill.losses import min_snr_weights
from offline import fashion_mnist
from offline.fashion_mnist import (
    FASHION_CLASSES,
    class_phrase,
    fashion_prompts,
    load_fashion_mnist,
    read_idx,
)
from offline.teacher import TeacherSettings, train_fashion_teachers
from offline.tokenizer import build_clip_tokenizer


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SD_DISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_matches_openai_clip_ids(cache_dir):
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    # Reference ids of OpenAI CLIP / SD v1 for this prompt.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (cache_dir / "clip-tokenizer" / "vocab.json").is_file()


def test_tokenizer_pads_to_77_with_end_of_text(tmp_path):
    tokenizer = build_clip_tokenizer(str(tmp_path))
    ids = tokenizer("a dress", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == 49406 and ids[-1] == 49407 == tokenizer.pad_token_id


def test_tokenizer_survives_save_and_reload(tmp_path):
    tokenizer = build_clip_tokenizer(str(tmp_path / "cache"))
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = CLIPTokenizer.from_pretrained(tmp_path / "saved")
    assert len(reloaded) == 49408
    assert reloaded.model_max_length == 77
    assert reloaded("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


# --- Fashion-MNIST ------------------------------------------------------------------------------


def test_read_idx_parses_header_and_data(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "tiny-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">III", 2, 3, 4) + data.tobytes())
    np.testing.assert_array_equal(read_idx(path), data)


def test_dataset_columns_and_captions_match_labels():
    dataset = load_fashion_mnist("test", max_samples=12, seed=3)
    assert len(dataset) == 12
    assert set(dataset.column_names) == {"image", "text", "label"}
    for row in dataset.select(range(6)):
        assert row["image"].size == (28, 28) and row["image"].mode == "RGB"
        assert class_phrase(row["label"]) in row["text"]
    # Test split's first labels in the original t10k file: ankle boot, pullover, trouser.
    assert dataset["label"][:3] == [9, 2, 1]


def test_dataset_captions_are_a_function_of_the_seed():
    assert (
        load_fashion_mnist("test", 30, seed=1)["text"] == load_fashion_mnist("test", 30, 1)["text"]
    )
    assert (
        load_fashion_mnist("test", 30, seed=1)["text"] != load_fashion_mnist("test", 30, 2)["text"]
    )


def test_missing_files_and_no_hub_raise_user_input_error(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_DIR", tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserInputError, match="dataset-fashion-mnist"):
        load_fashion_mnist("test")


def test_unknown_split_is_a_user_error():
    with pytest.raises(UserInputError, match="split"):
        load_fashion_mnist("validation")


def test_prompts_are_class_balanced_and_deterministic():
    prompts = fashion_prompts(40, seed=0)
    assert prompts == fashion_prompts(40, seed=0)
    for label in range(len(FASHION_CLASSES)):
        assert (
            sum(class_phrase(label) + "," in p or p.endswith(class_phrase(label)) for p in prompts)
            == 4
        )
    assert prompts[9].endswith("an ankle boot") or "an ankle boot," in prompts[9]


# --- teacher recipe -----------------------------------------------------------------------------


def test_min_snr_weights_clamp_high_snr_only():
    snr = torch.tensor([0.5, 5.0, 20.0])
    torch.testing.assert_close(min_snr_weights(snr, gamma=5.0), torch.tensor([1.0, 1.0, 0.25]))


def test_few_step_run_exports_two_loadable_teachers(tmp_path, cache_dir):
    settings = TeacherSettings(
        vae_steps=2,
        unet_steps=2,
        batch_size=4,
        seed=0,
        vae_batch_size=4,
        vae_channels=(8, 16, 16),
        unet_channels=(16, 32, 32),
        max_train_samples=64,
        grid_seeds=(0,),
        grid_inference_steps=2,
    )
    folders = train_fashion_teachers(tmp_path / "teachers", settings, progress=False)
    assert set(folders) == {"a", "b"}
    unets = {}
    for name, folder in folders.items():
        assert not list(folder.rglob("*.bin")), "safetensors only"
        assert (tmp_path / "teachers" / f"teacher_{name}.png").is_file()
        pipeline = StableDiffusionPipeline.from_pretrained(folder)
        pipeline.set_progress_bar_config(disable=True)
        assert pipeline.unet.config.layers_per_block == 2
        assert "CrossAttnDownBlock2D" in pipeline.unet.config.down_block_types
        image = pipeline(
            "a photo of a bag", num_inference_steps=2, generator=torch.Generator().manual_seed(0)
        ).images[0]
        assert image.size == (32, 32)
        unets[name] = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    # "a" is the halfway EMA, "b" the final one: same tensors, different values.
    assert unets["a"].keys() == unets["b"].keys()
    assert any(not torch.equal(unets["a"][k], unets["b"][k]) for k in unets["a"])
    record = json.loads((tmp_path / "teachers" / "training.json").read_text())
    vae_config = json.loads((folders["b"] / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == pytest.approx(record["scaling_factor"])
    assert record["scaling_factor"] != pytest.approx(0.18215)  # measured, not SD's default
