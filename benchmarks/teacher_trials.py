"""Experiments behind the Fashion-MNIST teacher recipe (`offline.teacher`).

Prints figures; writes grids and teachers under --out. Subcommands:

    text     cosine similarity of caption embeddings from the frozen random CLIP text encoder
    speed    per-step time of the VAE and UNet training steps (min and median over steps)
    trial    the whole recipe (train_fashion_teachers, on the engine) with the given settings,
             then the VAE's reconstruction L1 on the test split and `score`
    score    class accuracy of a teacher's samples, judged by a small Fashion-MNIST classifier

The classifier (a 2-conv CNN, 89% test accuracy) turns "are the rows class-consistent?" into a
number: the fraction of samples for prompt "a photo of a <class>" that it labels <class>.

    .venv/bin/python benchmarks/teacher_trials.py trial --out /tmp/trial1 --unet-steps 4000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from core.families import encode_captions
from core.image_grid import image_grid
from core.paths import default_cache_root
from offline.fashion_mnist import (
    CAPTION_TEMPLATES,
    FASHION_CLASSES,
    caption_for,
    fashion_pixels,
    load_fashion_mnist_arrays,
)
from offline.sample_grid import class_prompts
from offline.teacher import TeacherSettings, train_fashion_teachers
from offline.tiny_models import tiny_text_encoder, tiny_unet, tiny_vae
from offline.tokenizer import build_clip_tokenizer

# ---------------------------------------------------------------------------------------------
# The judge: a small classifier
# ---------------------------------------------------------------------------------------------


def classifier_net() -> nn.Module:
    """(B, 1, 32, 32) in [-1, 1] → (B, 10) logits."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(64 * 8 * 8, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def load_classifier() -> nn.Module:
    """Train once (2 epochs, ~1 min) and cache under the sd-distill cache dir."""
    path = default_cache_root() / "fashion_classifier.safetensors"
    net = classifier_net()
    if path.is_file():
        net.load_state_dict(load_file(path))
        return net.eval()
    torch.manual_seed(0)
    images, labels = load_fashion_mnist_arrays("train")
    labels = torch.from_numpy(labels)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    for epoch in range(2):
        order = torch.randperm(len(images))
        for start in range(0, len(images), 128):
            index = order[start : start + 128]
            x = fashion_pixels(images[index.numpy()])[:, :1]
            loss = F.cross_entropy(net(x), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"classifier epoch {epoch}: loss {loss.item():.3f}")
    net.eval()
    test_images, test_labels = load_fashion_mnist_arrays("test")
    print(
        f"classifier test accuracy: {accuracy(net, fashion_pixels(test_images), test_labels):.3f}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), path)
    return net


@torch.no_grad()
def accuracy(net: nn.Module, pixels: torch.Tensor, labels) -> float:
    """pixels (N, 3, 32, 32) in [-1, 1]; channel mean is what the classifier sees."""
    logits = torch.cat([net(chunk.mean(1, keepdim=True)) for chunk in pixels.split(500)])
    return float((logits.argmax(1) == torch.as_tensor(labels)).float().mean())


def pil_to_pixels(images) -> torch.Tensor:
    array = np.stack([np.asarray(image.convert("RGB")) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1)


# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------


def text_separation(args) -> None:
    """How different are the classes' caption embeddings? (cosine of flattened (77, D) states)."""
    tokenizer = build_clip_tokenizer()
    captions = [  # (label, template) order
        caption_for(label, template)
        for label in range(len(FASHION_CLASSES))
        for template in range(len(CAPTION_TEMPLATES))
    ]
    templates = len(captions) // len(FASHION_CLASSES)
    for factor in args.factors:
        for layers in args.layers:
            encoder = tiny_text_encoder(
                args.seed,
                hidden_size=args.hidden,
                num_hidden_layers=layers,
                initializer_factor=factor,
            )
            states = encode_captions(encoder, tokenizer, captions)  # (30, 77, D)
            flat = F.normalize(states.flatten(1), dim=1)
            cosine = flat @ flat.T
            label = torch.arange(len(captions)) // templates
            same_label = label[:, None] == label[None, :]
            off_diagonal = ~torch.eye(len(captions), dtype=torch.bool)
            between = cosine[~same_label].mean()
            within = cosine[same_label & off_diagonal].mean()
            print(
                f"init factor {factor:4.1f} layers {layers}: cosine between classes "
                f"{between:.3f}, same class other template {within:.3f}"
            )


def speed(args) -> None:
    """Per-step time; the minimum over steps estimates the uncontended cost."""

    def bench(name, model, loss_fn, steps=args.steps):
        optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
        times = []
        for _ in range(steps + 2):
            start = time.perf_counter()
            loss_fn().backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - start)
        times = times[2:]
        print(
            f"{name:44s} threads {torch.get_num_threads()}  min {min(times) * 1e3:5.0f} ms  "
            f"median {statistics.median(times) * 1e3:5.0f} ms",
            flush=True,
        )

    torch.manual_seed(0)
    for batch in args.vae_batch:
        x = torch.randn(batch, 3, 32, 32)
        vae = tiny_vae(tuple(args.vae_channels))
        bench(
            f"vae {tuple(args.vae_channels)} batch {batch}",
            vae,
            lambda vae=vae, x=x: (vae(x).sample - x).abs().mean(),
        )
    for batch in args.unet_batch:
        unet = tiny_unet(block_out_channels=tuple(args.unet_channels))
        z, t, c = (
            torch.randn(batch, 4, 8, 8),
            torch.randint(0, 1000, (batch,)),
            torch.randn(batch, 77, 32),
        )
        bench(
            f"unet {tuple(args.unet_channels)} batch {batch}",
            unet,
            lambda unet=unet, z=z, t=t, c=c: (unet(z, t, c).sample - z).pow(2).mean(),
        )


@torch.no_grad()
def report_vae(vae, out: Path, headline: str) -> None:
    test_images, test_labels = load_fashion_mnist_arrays("test")
    pixels = fashion_pixels(test_images[:1000])
    posterior = vae.encode(pixels).latent_dist
    reconstruction = vae.decode(posterior.mean).sample.clamp(-1, 1)
    l1 = (reconstruction - pixels).abs().mean()
    net = load_classifier()
    print(
        f"VAE: {headline}; test L1 {l1:.4f}; latent mean std {posterior.mean.std():.3f}, "
        f"posterior std {posterior.std.mean():.3f}; classifier accuracy originals "
        f"{accuracy(net, pixels, test_labels[:1000]):.3f}, reconstructions "
        f"{accuracy(net, reconstruction, test_labels[:1000]):.3f}"
    )
    to_pil = lambda t: __import__("PIL.Image").Image.fromarray(
        t.add(1).mul(127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    )
    rows = [[to_pil(p) for p in pixels[r * 16 : (r + 1) * 16]] for r in range(2)]
    rows += [[to_pil(p) for p in reconstruction[r * 16 : (r + 1) * 16]] for r in range(2)]
    image_grid(rows, row_labels=["original", "", "reconstructed", ""]).save(
        out / "vae_reconstructions.png"
    )
    print(
        f"reconstruction grid (rows 1-2 originals, 3-4 reconstructions): "
        f"{out / 'vae_reconstructions.png'}"
    )


def score(args) -> None:
    from diffusers import StableDiffusionPipeline

    net = load_classifier()
    for folder in args.teachers:
        pipeline = StableDiffusionPipeline.from_pretrained(folder)
        pipeline.set_progress_bar_config(disable=True)
        prompts = class_prompts()
        labels = [label for label in range(len(prompts)) for _ in range(args.per_class)]
        for guidance in args.guidance:
            start = time.perf_counter()
            generators = [torch.Generator().manual_seed(1000 + i) for i in range(len(labels))]
            images = pipeline(
                [prompts[y] for y in labels],
                generator=generators,
                guidance_scale=guidance,
                num_inference_steps=args.sample_steps,
            ).images
            pixels = pil_to_pixels(images)
            logits = torch.cat([net(c.mean(1, keepdim=True)) for c in pixels.split(500)])
            predicted = logits.argmax(1)
            per_class = [
                (predicted[torch.tensor(labels) == y] == y).float().mean().item()
                for y in range(len(prompts))
            ]
            print(
                f"{folder}: guidance {guidance:4.1f}: class accuracy "
                f"{accuracy(net, pixels, labels):.3f}  per class "
                f"{' '.join(f'{a:.2f}' for a in per_class)}  mean brightness "
                f"{pixels.mean():+.2f}  ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )


def trial(args) -> None:
    start = time.perf_counter()
    settings = TeacherSettings(
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        vae_lr=args.vae_lr,
        vae_batch_size=args.vae_batch_size,
        kl_weight=args.kl_weight,
        vae_channels=tuple(args.vae_channels),
        unet_channels=tuple(args.unet_channels),
        text_init_factor=args.text_init_factor,
        text_layers=args.text_layers,
        max_train_samples=args.max_train_samples,
        min_snr_gamma=None if args.min_snr_gamma <= 0 else args.min_snr_gamma,
        uncond_prob=args.uncond_prob,
        ema_max_decay=args.ema_max_decay,
        guidance_scale=args.guidance[0],
    )
    folders = train_fashion_teachers(args.out, settings, progress=not args.quiet)
    total = time.perf_counter() - start
    record = json.loads((Path(args.out) / "training.json").read_text())
    print(
        f"trial {args.out}: total {total:.0f} s; phases {record['seconds']}; "
        f"scaling factor {record['scaling_factor']:.3f}; last logged terms "
        f"{record['last_logged_terms']}; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    from diffusers import AutoencoderKL

    report_vae(
        AutoencoderKL.from_pretrained(folders["b"], subfolder="vae"),
        Path(args.out),
        "trained in the trial",
    )
    args.teachers = [str(folders[name]) for name in sorted(folders)]
    score(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["text", "speed", "trial", "score"])
    parser.add_argument("--out", default="/work/teachers/trial")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-batch-size", type=int, default=32)
    parser.add_argument("--kl-weight", type=float, default=1e-3)
    parser.add_argument("--vae-channels", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--unet-steps", type=int, default=2000)
    parser.add_argument("--unet-channels", type=int, nargs="+", default=[32, 64, 64])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-snr-gamma", type=float, default=5.0, help="<= 0 disables")
    parser.add_argument("--uncond-prob", type=float, default=0.1)
    parser.add_argument("--ema-max-decay", type=float, default=0.999)
    parser.add_argument("--text-init-factor", type=float, default=1.0)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--max-train-samples", type=int, default=20000)
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--teachers", nargs="*", default=[])
    parser.add_argument("--quiet", action="store_true")
    # text
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--hidden", type=int, default=32)
    # speed
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--vae-batch", type=int, nargs="*", default=[32, 64])
    parser.add_argument("--unet-batch", type=int, nargs="*", default=[64, 128])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    commands = {
        "text": text_separation,
        "speed": speed,
        "trial": trial,
        "score": score,
    }
    commands[args.command](args)


if __name__ == "__main__":
    main()
