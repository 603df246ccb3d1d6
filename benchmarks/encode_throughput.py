"""What the latent cache costs: encoding speed and size at SD scale, and reading as it grows.

    .venv/bin/python benchmarks/encode_throughput.py sd         # 512 px, SD v1.4's VAE shapes
    .venv/bin/python benchmarks/encode_throughput.py growth     # open time and RSS, 2k to 200k

`sd`: the engine's own `build_latent_cache` on `--images` random 512×512 photos-like images (noise
at several scales) with a random-weight VAE of SD v1.4's configuration (83.7M parameters), both
flips, float16 and float32: images/s, bytes per pair (both flips included) and peak RSS. Then the
price of caching token ids instead of text embeddings: one forward of SD v1.4's text encoder shape
(CLIP ViT-L/14 text tower, random weights) at the training batch size, against the UNet step it
joins (its FLOPs from `torch.utils.flop_counter`, next to `benchmarks/sd_step.py`'s).

`growth`: caches of 2k, 20k and 200k pairs built with the offline world's tiny VAE at 32 px (rows
of Fashion-MNIST repeated), then, in a fresh process each: the time to open the cache and the
reader's resident memory after opening it and after 1000 random reads. Flat means the reader
holds nothing per pair.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from core.families import TextConditioning
from distill.data import LatentCache, PreprocessSpec, build_latent_cache
from offline.fashion_mnist import load_fashion_mnist
from offline.tiny_models import tiny_vae
from offline.tokenizer import build_clip_tokenizer

GIB = 1024**3
# SD v1.4's vae/config.json and its text encoder (CLIP ViT-L/14): facts of the public configs.
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def current_rss_gib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def rss_split_mib() -> dict[str, float]:
    """RSS by kind (/proc/self/status): `anon`, memory the process holds (heap, tensors), and
    `file`, pages of memory-mapped files (the shards, read through safetensors' mmap), which the
    kernel may drop and re-read at will: they grow with the shard bytes touched, not with state."""
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("RssAnon:", "RssFile:")):
                name, kib, _ = line.split()
                fields[name.removeprefix("Rss").removesuffix(":").lower()] = int(kib) / 1024
    return fields


def photo_like(count: int, size: int, seed: int = 0) -> datasets.Dataset:
    """Random images with structure at several scales (upsampled noise), and captions."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        layers = [
            np.asarray(
                Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)).resize(
                    (size, size), Image.Resampling.BICUBIC
                ),
                dtype=np.float32,
            )
            for s in (4, 16, 64)
        ]
        images.append(Image.fromarray(np.clip(sum(layers) / 3, 0, 255).astype(np.uint8)))
    captions = [f"a photograph of thing {i}" for i in range(count)]
    return datasets.Dataset.from_dict({"image": images, "text": captions}).cast_column(
        "image", datasets.Image()
    )


def sd_scale(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE).eval()
    tokenizer = build_clip_tokenizer()
    rows = photo_like(args.images, 512)
    result: dict[str, Any] = {
        "images": args.images,
        "resolution": 512,
        "threads": torch.get_num_threads(),
    }
    for dtype in ("float16", "float32"):
        with tempfile.TemporaryDirectory() as root:
            started = time.perf_counter()
            cache = build_latent_cache(
                rows,
                vae=vae,
                conditioning=TextConditioning(tokenizer),
                preprocess=PreprocessSpec(512, random_flip=True),
                cache_root=root,
                batch_size=args.batch_size,
                storage_dtype=dtype,
                num_workers=args.workers,
                progress=False,
            )
            seconds = time.perf_counter() - started
            result[dtype] = {
                "images_per_s": args.images / seconds,
                "seconds": seconds,
                "bytes_per_pair": cache.bytes_per_pair,
            }
    result["peak_rss_gib"] = peak_rss_gib()
    result["text_encoder"] = text_encoder_cost(args.text_batch)
    return result


def text_encoder_cost(batch: int) -> dict[str, float]:
    """Seconds and GFLOP of SD v1.4's text encoder forward on `batch` captions of 77 tokens."""
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(**SD_TEXT)).eval()
    ids = torch.randint(0, SD_TEXT["vocab_size"], (batch, 77))
    with torch.no_grad():
        encoder(ids)  # warm-up
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            encoder(ids)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            encoder(ids)
            times.append(time.perf_counter() - started)
    return {"batch": batch, "seconds": sorted(times)[1], "gflop": counter.get_total_flops() / 1e9}


def growth(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.root or tempfile.mkdtemp(prefix="cache-growth-"))
    vae = tiny_vae((16, 32, 64)).eval()  # the offline teachers' VAE shape
    tokenizer = build_clip_tokenizer()
    base = load_fashion_mnist("train", max_samples=10_000)
    result = {}
    for pairs in args.sizes:
        repeats = -(-pairs // len(base))
        rows = datasets.concatenate_datasets([base] * repeats).select(range(pairs))
        started = time.perf_counter()
        cache = build_latent_cache(
            rows,
            vae=vae,
            conditioning=TextConditioning(tokenizer),
            preprocess=PreprocessSpec(32),
            cache_root=root,
            batch_size=256,
            num_workers=args.workers,
            progress=False,
        )
        built = time.perf_counter() - started
        probe = subprocess.run(
            [sys.executable, __file__, "open", str(cache.folder)],
            capture_output=True,
            text=True,
            check=True,
        )
        result[pairs] = {"build_seconds": built, **json.loads(probe.stdout)}
    return result


def open_and_read(folder: str) -> dict[str, float]:
    """In a fresh process: seconds to open, RSS after opening and after 1000 random reads (all,
    and its anonymous and file-backed parts after the reads, as growth over the start)."""
    rss_before = current_rss_gib()
    split_before = rss_split_mib()
    started = time.perf_counter()
    cache = LatentCache(folder)
    opened = time.perf_counter() - started
    rss_open = current_rss_gib()
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for index in rng.integers(0, len(cache), 1000):
        cache.shown(int(index), 0)
    reads = time.perf_counter() - started
    return {
        "open_seconds": opened,
        "rss_opened_mib": (rss_open - rss_before) * 1024,
        "rss_after_reads_mib": (current_rss_gib() - rss_before) * 1024,
        **{
            f"rss_{kind}_after_reads_mib": mib - split_before[kind]
            for kind, mib in rss_split_mib().items()
        },
        "ms_per_read": reads,  # 1000 reads: seconds in all = milliseconds per read
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sd = commands.add_parser("sd")
    sd.add_argument("--images", type=int, default=8)
    sd.add_argument("--batch-size", type=int, default=4)
    sd.add_argument("--workers", type=int, default=1)
    sd.add_argument("--text-batch", type=int, default=32, help="the training batch (CUDA default)")
    grow = commands.add_parser("growth")
    grow.add_argument("--sizes", type=int, nargs="+", default=[2_000, 20_000, 200_000])
    grow.add_argument("--workers", type=int, default=1)
    grow.add_argument("--root", help="where the caches go (default: a temporary folder)")
    opened = commands.add_parser("open", help="(internal) measure opening one cache")
    opened.add_argument("folder")
    args = parser.parse_args(argv)
    if args.command == "open":
        result = open_and_read(args.folder)
    else:
        result = sd_scale(args) if args.command == "sd" else growth(args)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
