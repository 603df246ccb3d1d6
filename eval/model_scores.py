"""What a comparison needs of one model, computed once and kept: its images' Inception features
and, where a registered judge applies (the offline world's, for Fashion-MNIST prompts), whether
it sees each image's prompted class.

    FOLDER/images/000000.png ...     (eval.generate: reused while the weights and settings hold)
    FOLDER/scores.safetensors        features (n, 2048) float32, correct (n,) float32; the metadata
                                     holds the key they were computed under (a hash of the
                                     weights' fingerprint, the settings, the prompts and the
                                     Inception weights) and they are recomputed when it differs
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from core.atomic import atomic_path
from core.families import load_pipeline
from core.fingerprints import pipeline_fingerprint
from eval.fid import image_features
from eval.generate import GenerationSettings, generate_images


@dataclass(frozen=True)
class ModelScores:
    """Row i: prompt i, seed `settings.seed` + i. `correct` is None when no judge applies (the
    offline world's judge: Fashion-MNIST captions only)."""

    features: torch.Tensor  # (n, 2048) float32
    correct: torch.Tensor | None  # (n,) float32: 1.0 where the judge agrees with the prompt
    fingerprint: str
    settings: dict[str, Any]


def score_model(
    model: str | Path,
    folder: str | Path,
    prompts: Sequence[str],
    settings: GenerationSettings,
    *,
    inception: Any,
    inception_key: str,
    judge: Any | None,
    device: torch.device,
    progress: bool = True,
    desc: str = "model",
) -> ModelScores:
    """`model`'s scores on `prompts`, from FOLDER when they were computed under the same key."""
    folder = Path(folder)
    fingerprint = pipeline_fingerprint(model)
    key = _key(fingerprint, settings, prompts, inception_key, judge)
    cached = _load(folder / "scores.safetensors", key)
    if cached is not None:
        return cached
    pipeline = load_pipeline(model, torch.float32).to(device)
    pipeline.set_progress_bar_config(disable=True)
    images = generate_images(
        pipeline,
        list(prompts),
        folder / "images",
        settings,
        fingerprint=fingerprint,
        progress=progress,
        desc=f"generate {desc}",
    )
    del pipeline
    gc.collect()
    features = image_features(
        images.paths, inception, device=device, progress=progress, desc=f"features {desc}"
    )
    correct = None
    if judge is not None and judge.applies(prompts):
        correct = judge.correct(images.paths, prompts)  # (n,)
    scores = ModelScores(features, correct, fingerprint, images.settings)
    _save(folder / "scores.safetensors", key, scores)
    return scores


def _key(
    fingerprint: str,
    settings: GenerationSettings,
    prompts: Sequence[str],
    inception_key: str,
    judge: Any | None,
) -> str:
    text = json.dumps(
        {
            "fingerprint": fingerprint,
            "settings": asdict(settings),
            "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
            "inception": inception_key,
            "judge": getattr(judge, "key", None),
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _load(path: Path, key: str) -> ModelScores | None:
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("key") != key:
        return None
    tensors = load_file(str(path))
    return ModelScores(
        tensors["features"],
        tensors.get("correct"),
        metadata["fingerprint"],
        json.loads(metadata["settings"]),
    )


def _save(path: Path, key: str, scores: ModelScores) -> None:
    tensors = {"features": scores.features.contiguous()}
    if scores.correct is not None:
        tensors["correct"] = scores.correct.contiguous()
    metadata = {
        "key": key,
        "fingerprint": scores.fingerprint,
        "settings": json.dumps(scores.settings, sort_keys=True),
    }
    with atomic_path(path) as partial:
        save_file(tensors, str(partial), metadata=metadata)
