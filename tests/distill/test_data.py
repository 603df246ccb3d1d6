"""Data layer: sources, preprocessing, and the latent cache (posteriors + caption token ids), on
tiny seeded real models (a (8, 16) AutoencoderKL, a 2-layer CLIP text encoder, the real CLIP
tokenizer)."""

from __future__ import annotations

import copy
import io
import json
import pickle
import tarfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from core.errors import UserInputError
from core.families import TextConditioning
from core.identity import stable_hash
from distill.data import (
    LatentCache,
    PreprocessSpec,
    build_latent_cache,
    flip_choice,
    load_image_text_dataset,
    preprocess_image,
    sample_latents,
    streaming_fingerprint,
)
from distill.data.build import CacheWaitTimeout, ProcessLayout, cache_key_inputs
from distill.data.preprocess import crop_box
from distill.data.shards import META_FILE, SHARD_GLOB
from distill.data.sources import expand_braces
from offline.fashion_mnist import FASHION_MNIST_DIR
from offline.tokenizer import build_clip_tokenizer

RESOLUTION = 16  # the (8, 16) VAE downsamples once: 4×8×8 latents, like the offline world
SPEC = PreprocessSpec(RESOLUTION, center_crop=True, random_flip=True)

# (file, caption, size): rows 5 and 7 have unusable captions, row "broken" is not an image.
ROWS = [
    ("a.png", "a red square", (24, 20)),
    ("b.png", "a blue circle", (16, 30)),
    ("broken.png", "a broken file", None),
    ("c.png", "a red square", (20, 20)),  # same caption as a.png: stored once per shard
    ("d.png", "a green line", (40, 17)),
    ("e.png", "a tall tree", (18, 33)),
    ("f.png", "", (20, 20)),
    ("g.png", None, (20, 20)),
]
USABLE = 5
ROWS_BY_SOURCE = [caption for _, caption, _ in ROWS]
SKIPPED = {"unreadable_row": 0, "unreadable_image": 1, "missing_caption": 1, "empty_caption": 1}


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=RESOLUTION,
    ).eval()


def tiny_text_encoder(tokenizer) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tokenizer = build_clip_tokenizer(cache_dir=str(tmp_path_factory.mktemp("tokenizer")))
    return SimpleNamespace(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer
    )


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-datasets")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """The LAION/BK-SDM layout: images plus metadata.jsonl with `file_name` and `text`."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for name, caption, size in ROWS:
            if size is None:
                (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n but not really a png")
            else:
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / name)
            metadata.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return folder


@pytest.fixture(scope="module")
def dataset(image_folder, hf_cache) -> datasets.Dataset:
    return load_image_text_dataset(str(image_folder), cache_dir=hf_cache)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("latent-cache")


@pytest.fixture(scope="module")
def cache(dataset, models, cache_root) -> LatentCache:
    return build(dataset, models, cache_root)


def build(dataset, models, cache_root, **overrides) -> LatentCache:
    arguments = dict(
        vae=models.vae,
        conditioning=TextConditioning(models.tokenizer),
        preprocess=SPEC,
        cache_root=cache_root,
        batch_size=2,
        storage_dtype="float32",
        progress=False,
    )
    return build_latent_cache(dataset, **{**arguments, **overrides})


@contextmanager
def count_encoded(models):
    """Count images through the VAE encoder and captions through the text encoder."""
    counts = {"images": 0, "captions": 0}

    def vae_hook(module, inputs, output):
        counts["images"] += inputs[0].shape[0]

    def text_hook(module, inputs, output):
        counts["captions"] += inputs[0].shape[0]

    handles = [
        models.vae.encoder.register_forward_hook(vae_hook),
        models.text_encoder.register_forward_hook(text_hook),
    ]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def reference_ids(models, caption: str) -> torch.Tensor:
    tokens = models.tokenizer(
        caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    return tokens.input_ids[0]


def reference_text_embedding(models, caption: str) -> torch.Tensor:
    with torch.no_grad():
        return models.text_encoder(reference_ids(models, caption)[None]).last_hidden_state[0]


# ----------------------------------------------------------------------------- sources


def test_imagefolder_rows_are_pil_images_and_captions(dataset):
    assert dataset.column_names == ["image", "text"]
    assert len(dataset) == len(ROWS)
    captions = sorted(c for c in dataset["text"] if c)
    assert captions == sorted(c for _, c, _ in ROWS if c)


def test_missing_column_is_named_with_the_available_columns(image_folder, hf_cache):
    with pytest.raises(
        UserInputError, match=r"'caption' not found.*available columns: image, text"
    ):
        load_image_text_dataset(str(image_folder), text_column="caption", cache_dir=hf_cache)


def test_missing_folder_and_missing_shards_are_user_errors(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_image_text_dataset(str(tmp_path / "no-such-folder"))
    with pytest.raises(UserInputError, match="no webdataset shards match"):
        load_image_text_dataset(str(tmp_path / "shard-{000..003}.tar"))


def test_unreachable_hub_dataset_is_a_user_error(monkeypatch):
    # What the offline world sees, without waiting for the hub client's network retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(UserInputError, match="'someone/no-such-dataset' could not be loaded"):
        load_image_text_dataset("someone/no-such-dataset")


def test_saved_to_disk_dataset_loads_with_renamed_columns(dataset, tmp_path):
    readable = [
        i for i, text in enumerate(dataset["text"]) if text in ("a blue circle", "a tall tree")
    ]
    good = dataset.select(readable)
    good.rename_column("text", "caption").save_to_disk(str(tmp_path / "saved"))
    loaded = load_image_text_dataset(str(tmp_path / "saved"), text_column="caption")
    assert loaded.column_names == ["image", "text"]
    assert loaded["text"] == good["text"]
    assert isinstance(loaded[0]["image"], Image.Image)
    first = load_image_text_dataset(str(tmp_path / "saved"), text_column="caption", max_samples=1)
    assert first["text"] == good["text"][:1]


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("s-{008..010}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar"]
    assert expand_braces("{a,b}-{0..1}.tar") == ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian dataset-fashion-mnist missing")
def test_fashion_mnist_is_the_offline_source():
    rows = load_image_text_dataset("fashion-mnist", max_samples=4)
    assert rows.column_names == ["image", "text"] and len(rows) == 4
    assert rows[0]["image"].size == (28, 28) and isinstance(rows[0]["text"], str)


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_gives_rgb_square_in_minus_one_to_one():
    grey = Image.new("L", (37, 23), color=51)  # greyscale, not square, not the target size
    pixels = preprocess_image(grey, PreprocessSpec(RESOLUTION))
    assert pixels.shape == (3, RESOLUTION, RESOLUTION) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, torch.full_like(pixels, 51 / 255 * 2 - 1))


def test_center_crop_keeps_the_middle_and_flip_mirrors_it():
    # Column x has value x: a 48×16 image needs no resize at R=16, so the crop shows exactly.
    columns = np.tile(np.arange(48, dtype=np.uint8), (16, 1))
    image = Image.fromarray(np.stack([columns] * 3, axis=-1))
    pixels = preprocess_image(image, PreprocessSpec(16))
    torch.testing.assert_close(pixels[0, 0], torch.arange(16, 32) / 255 * 2 - 1)
    flipped = preprocess_image(image, PreprocessSpec(16), flip=True)
    assert torch.equal(flipped, pixels.flip(-1))


def test_random_crop_is_reproducible_from_its_generator():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    spec = PreprocessSpec(16, center_crop=False)
    first = preprocess_image(image, spec, generator=torch.Generator().manual_seed(3))
    again = preprocess_image(image, spec, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    # 60×40 resizes to 24×16: only the left offset (0..8) is random, and seeds move it.
    lefts = {
        crop_box(16, 24, 16, center=False, generator=torch.Generator().manual_seed(s))[1]
        for s in range(8)
    }
    assert len(lefts) > 1 and lefts <= set(range(9))


def test_preprocess_fingerprint_is_stable_and_covers_every_field():
    spec = PreprocessSpec(512)
    # Recorded: a change of this value re-keys every latent cache (it did once, when size_ids
    # was added).
    assert spec.fingerprint() == PreprocessSpec(512).fingerprint() == "5ed80c5d651a1749"
    variants = {
        PreprocessSpec(256).fingerprint(),
        PreprocessSpec(512, center_crop=False).fingerprint(),
        PreprocessSpec(512, random_flip=True).fingerprint(),
        PreprocessSpec(512, size_ids="target").fingerprint(),
    }
    assert spec.fingerprint() not in variants and len(variants) == 4


# ----------------------------------------------------------------------------- the cache


def test_cache_keeps_usable_rows_and_counts_the_skipped(cache, cache_root):
    assert len(cache) == USABLE
    assert cache.skipped == SKIPPED
    meta = json.loads((cache.folder / META_FILE).read_text())
    assert meta["source_rows"] == len(ROWS) and meta["skipped"] == SKIPPED
    assert meta["latent_shape"] == [4, 8, 8] and meta["num_variants"] == 2
    assert cache.folder.parent == cache_root


def test_cached_posterior_equals_direct_vae_encode_for_both_flips(cache, dataset, models):
    for index in range(len(cache)):
        row = dataset[int(cache.item(index)["source_index"])]
        for variant, flip in ((0, False), (1, True)):
            item = cache.item(index, variant)
            pixels = preprocess_image(row["image"], SPEC, flip=flip)[None]  # (1, 3, R, R)
            with torch.no_grad():
                posterior = models.vae.encode(pixels).latent_dist
            torch.testing.assert_close(item["latent_mean"], posterior.mean[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(item["latent_std"], posterior.std[0], atol=1e-5, rtol=1e-4)
        original, flipped = cache.item(index, 0), cache.item(index, 1)
        # The flipped image is encoded on its own: its latents are not the mirrored latents.
        assert not torch.allclose(flipped["latent_mean"], original["latent_mean"].flip(-1))
        assert torch.equal(original["input_ids"].long(), reference_ids(models, row["text"]))


def test_the_step_encodes_the_cached_ids_into_the_pipelines_text_embeddings(cache, models):
    conditioning = TextConditioning(models.tokenizer, models.text_encoder)
    batch = cache.batch([(0, 0), (1, 0)])
    hidden = conditioning.encode(batch.conditioning)["encoder_hidden_states"]  # (2, 77, 32)
    captions = [ROWS_BY_SOURCE[int(cache.item(i)["source_index"])] for i in (0, 1)]
    for row, caption in enumerate(captions):
        torch.testing.assert_close(hidden[row], reference_text_embedding(models, caption))


def test_empty_prompt_ids_are_stored_once(cache, models):
    empty = cache.empty_conditioning["input_ids"]
    assert empty.shape == (77,) and torch.equal(empty.long(), reference_ids(models, ""))


def test_repeated_captions_are_stored_once_per_shard(cache):
    with safe_open(str(next(cache.folder.glob(SHARD_GLOB))), framework="pt") as shard:
        assert shard.get_slice("text_slot").get_shape() == [USABLE]
        assert shard.get_slice("caption.input_ids").get_shape() == [USABLE - 1, 77]


def test_second_build_reuses_the_cache_without_encoding(cache, dataset, models, cache_root):
    mtimes = {path: path.stat().st_mtime_ns for path in cache.folder.iterdir()}
    with count_encoded(models) as counts:
        again = build(dataset, models, cache_root)
    assert counts == {"images": 0, "captions": 0}  # the text encoder never runs for a cache
    assert again.folder == cache.folder
    assert {path: path.stat().st_mtime_ns for path in cache.folder.iterdir()} == mtimes


def test_cache_key_follows_vae_weights_not_object_identity(dataset, models):
    def key(vae, preprocess=SPEC, dtype="float32", text_encoder=None):
        inputs = cache_key_inputs(
            dataset_fingerprint=dataset._fingerprint,
            vae=vae,
            conditioning=TextConditioning(models.tokenizer, text_encoder),
            preprocess=preprocess,
            storage_dtype=dtype,
            rows_per_shard=1024,
        )
        return stable_hash(inputs)

    assert key(models.vae, dtype="float16") != key(models.vae)
    # Only the tokenizer decides the cached ids: another text encoder shares the cache.
    assert key(models.vae, text_encoder=models.text_encoder) == key(models.vae)

    perturbed = copy.deepcopy(models.vae)
    with torch.no_grad():
        perturbed.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    assert key(tiny_vae(seed=0)) == key(models.vae)  # a separate object, same weights
    assert key(perturbed) != key(models.vae)
    assert key(models.vae, PreprocessSpec(RESOLUTION)) != key(models.vae)


def test_changed_vae_builds_a_separate_cache(cache, dataset, models, cache_root):
    perturbed = copy.deepcopy(models.vae)
    with torch.no_grad():
        perturbed.encoder.conv_in.bias.add_(0.5)
    other = build(dataset, SimpleNamespace(**{**vars(models), "vae": perturbed}), cache_root)
    assert other.folder != cache.folder and len(other) == len(cache)
    assert not torch.allclose(other.item(0)["latent_mean"], cache.item(0)["latent_mean"])


def test_interrupted_build_keeps_every_finished_shard(dataset, models, tmp_path):
    first = build(dataset, models, tmp_path, rows_per_shard=2)
    shards = sorted(first.folder.glob(SHARD_GLOB))
    assert len(shards) == 4  # rows [0, 2), [2, 4) with the broken file, [4, 6), [6, 8): no caption
    expected = [first.item(i, 1) for i in range(len(first))]
    # Simulate a crash that left shard 2 unwritten, and meta.json.
    (first.folder / META_FILE).unlink()
    shards[2].unlink()
    with pytest.raises(UserInputError, match="no complete latent cache"):
        LatentCache(first.folder)
    with count_encoded(models) as counts:
        resumed = build(dataset, models, tmp_path, rows_per_shard=2)
    assert counts["images"] == 4  # only d.png and e.png, both flips
    assert resumed.skipped == SKIPPED and len(resumed) == USABLE
    for index, item in enumerate(expected):
        torch.testing.assert_close(resumed.item(index, 1), item)


def test_two_processes_build_the_same_cache_to_the_byte_as_one(dataset, models, tmp_path):
    """Each process encodes the shards k with k mod W = its rank; process 0 writes meta.json
    once it sees every process's marker. Run here one after the other, rank 1 first: it finds
    no meta.json within its timeout, then picks up the finished cache."""
    single = build(dataset, models, tmp_path / "one", rows_per_shard=2)
    layouts = [ProcessLayout(rank, 2) for rank in (0, 1)]
    with pytest.raises(CacheWaitTimeout, match="meta.json"):
        build(
            dataset, models, tmp_path / "two", rows_per_shard=2, layout=layouts[1], wait_timeout=0.1
        )
    with count_encoded(models) as counts:
        double = build(dataset, models, tmp_path / "two", rows_per_shard=2, layout=layouts[0])
    assert counts["images"] == 8  # rank 0's shards 0 and 2 only: a, b, d, e, both flips
    assert (
        build(dataset, models, tmp_path / "two", rows_per_shard=2, layout=layouts[1]).folder
        == double.folder
    )
    data_files = lambda folder: {  # noqa: E731
        p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith("done-")
    }
    assert data_files(double.folder) == data_files(single.folder)


def test_reads_pickle_into_dataloader_workers_and_batch(cache):
    pickle.loads(pickle.dumps(cache))  # open shard handles must not stop DataLoader workers
    batch = next(iter(torch.utils.data.DataLoader(cache, batch_size=4)))
    assert (
        batch["latent_mean"].shape == (4, 4, 8, 8) and batch["latent_mean"].dtype == torch.float32
    )
    assert batch["input_ids"].shape == (4, 77)


def test_flip_choice_is_a_fair_pure_function_of_seed_epoch_index(cache):
    flips = [flip_choice(0, 0, i) for i in range(4000)]
    assert flips == [flip_choice(0, 0, i) for i in range(4000)]
    assert 1800 < sum(flips) < 2200
    assert flips[:64] != [flip_choice(0, 1, i) for i in range(64)]
    assert flips[:64] != [flip_choice(1, 0, i) for i in range(64)]
    cache.set_epoch(3)
    for index in range(len(cache)):
        item = cache[index]
        assert bool(item["flipped"]) == flip_choice(cache.seed, 3, index)
        torch.testing.assert_close(item, cache.item(index, int(item["flipped"])))
    cache.set_epoch(0)


def test_sample_latents_equals_diffusers_posterior_sample():
    torch.manual_seed(0)
    mean, logvar = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    expected = posterior.sample(generator=torch.Generator().manual_seed(7)) * 0.18215
    ours = sample_latents(mean, posterior.std, 0.18215, torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, expected)
    shifted = sample_latents(
        mean, posterior.std, 0.5, torch.Generator().manual_seed(7), shift_factor=0.1
    )
    torch.testing.assert_close(shifted, (expected / 0.18215 - 0.1) * 0.5)


def test_a_16_bit_cache_holds_the_32_bit_posterior_to_16_bit_precision(
    cache, dataset, models, tmp_path
):
    half = build(dataset, models, tmp_path, storage_dtype="float16")
    assert half.folder != cache.folder and len(half) == len(cache)
    for index in range(len(cache)):
        exact, stored = cache.item(index, 1), half.item(index, 1)
        torch.testing.assert_close(
            stored["latent_mean"], exact["latent_mean"], rtol=1e-3, atol=1e-3
        )
        torch.testing.assert_close(stored["latent_std"], exact["latent_std"], rtol=5e-3, atol=1e-6)
        assert torch.equal(stored["input_ids"], exact["input_ids"])
    assert half.meta["bytes"] < 0.75 * cache.meta["bytes"]


# ----------------------------------------------------------------------------- webdataset


def write_shard(path: Path, samples: list[tuple[str, bytes, str]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image_bytes, caption in samples:
            for name, data in ((f"{key}.jpg", image_bytes), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def jpeg_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_webdataset_shards_stream_into_the_cache(models, tmp_path, hf_cache):
    write_shard(
        tmp_path / "shard-000.tar", [("000", jpeg_bytes(0), "one"), ("001", jpeg_bytes(1), "two")]
    )
    write_shard(
        tmp_path / "shard-001.tar",
        [("002", jpeg_bytes(2), "three"), ("003", b"\xff\xd8 cut", "four")],
    )
    source = str(tmp_path / "shard-{000..001}.tar")
    rows = load_image_text_dataset(source, cache_dir=hf_cache)
    assert isinstance(rows, datasets.IterableDataset)
    first = next(iter(rows))
    assert set(first) == {"image", "text"} and isinstance(first["image"], Image.Image)

    with pytest.raises(ValueError, match="streamed dataset has no fingerprint"):
        build(rows, models, tmp_path / "cache")
    cache = build(
        rows, models, tmp_path / "cache", dataset_fingerprint=streaming_fingerprint(source)
    )
    assert len(cache) == 3 and cache.skipped == SKIPPED | {"missing_caption": 0, "empty_caption": 0}
    assert [int(cache.item(i)["source_index"]) for i in range(3)] == [0, 1, 2]


# --- a folder of corrupt and odd inputs --------------------------------------------------------


def _png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def faulty_folder(tmp_path_factory) -> Path:
    """Every kind of bad entry a LAION-scale folder holds, beside odd images that are valid."""
    folder = tmp_path_factory.mktemp("faulty")
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    files = {
        "good.png": _png_bytes(photo),
        "zero.png": b"",
        "cut.png": _png_bytes(photo)[:60],
        "cut.jpg": _png_bytes(photo, "JPEG")[:200],
        "text.png": b"this is a text file with a .png name\n",
        "sliver.png": _png_bytes(Image.new("RGB", (1, 4000), (200, 10, 10))),
        "grey16.png": _png_bytes(Image.fromarray(np.full((20, 20), 32768, np.uint16))),
        "cmyk.jpg": _png_bytes(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG"),
        "number.png": _png_bytes(photo),
        "list.png": _png_bytes(photo),
        "empty.png": _png_bytes(photo),
        "null.png": _png_bytes(photo),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    captions = {name: f"a photo of {name}" for name in files}
    captions |= {"number.png": 3, "list.png": ["a", 1], "empty.png": "  ", "null.png": None}
    lines = [json.dumps({"file_name": name, "text": text}) for name, text in captions.items()]
    lines.insert(3, '{"file_name": "good.png", "text": "cut off mid-li')  # not JSON
    lines.append(json.dumps({"file_name": "missing.png", "text": "no such file"}))
    lines.append(json.dumps({"file_name": "good.png"}))  # no caption key at all
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


FAULTY_USED = ["good", "sliver", "grey16", "cmyk", "number", "list"]  # in metadata order
FAULTY_SKIPPED = {
    "unreadable_row": 1,  # the line that is not JSON
    "unreadable_image": 5,  # zero-byte, truncated PNG and JPEG, text file, missing file
    "missing_caption": 2,  # null, and no "text" key
    "empty_caption": 1,
}


def test_corrupt_entries_are_each_skipped_and_counted_and_odd_images_are_used(
    faulty_folder, models, tmp_path
):
    rows = load_image_text_dataset(str(faulty_folder))
    cache = build(rows, models, tmp_path / "cache")
    assert cache.skipped == FAULTY_SKIPPED
    used = [rows[int(cache.item(i)["source_index"])] for i in range(len(cache))]
    assert [Path(row["image"].filename).stem for row in used] == FAULTY_USED
    captions = {Path(row["image"].filename).stem: row["text"] for row in used}
    assert captions["number"] == "3" and captions["list"] == '["a", 1]'  # numbers are text
    # The numeric caption was tokenized as the text "3".
    number = FAULTY_USED.index("number")
    assert torch.equal(cache.item(number)["input_ids"].long(), reference_ids(models, "3"))


def test_a_16_bit_image_is_scaled_not_clipped_and_cmyk_becomes_rgb(faulty_folder):
    spec = PreprocessSpec(8)
    grey = preprocess_image(Image.open(faulty_folder / "grey16.png"), spec)  # 32768 / 65535
    torch.testing.assert_close(grey, torch.full_like(grey, 128 / 255 * 2 - 1), atol=1e-2, rtol=0)
    red = preprocess_image(Image.open(faulty_folder / "cmyk.jpg"), spec)
    assert red[0].mean() > 0.8 and red[1:].mean() < -0.8  # C=0, M=Y=255: red


def test_a_sliver_is_cropped_before_it_is_resized(faulty_folder):
    pixels = preprocess_image(Image.open(faulty_folder / "sliver.png"), PreprocessSpec(512))
    assert pixels.shape == (3, 512, 512)  # not the 512×2,048,000 a resize-first would make


def test_csv_captions_and_a_saved_dataset_with_numeric_and_null_captions(models, tmp_path):
    folder = tmp_path / "csv"
    folder.mkdir()
    for index in range(3):
        Image.new("RGB", (16, 16), (index * 80, 0, 0)).save(folder / f"{index}.png")
    (folder / "metadata.csv").write_text("file_name,text\n0.png,a red one\n1.png,\n2.png,7\n")
    cache = build(load_image_text_dataset(str(folder)), models, tmp_path / "cache-csv")
    assert len(cache) == 2 and cache.skipped["empty_caption"] == 1

    saved = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (16, 16))] * 3, "caption": [7, None, 9]}
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    rows = load_image_text_dataset(str(tmp_path / "saved"), text_column="caption")
    cache = build(rows, models, tmp_path / "cache-saved")
    assert len(cache) == 2 and cache.skipped["missing_caption"] == 1
