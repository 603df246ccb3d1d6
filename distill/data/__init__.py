"""Training data: image/text sources, preprocessing, and the on-disk latent cache.

Typical use (one cache per dataset × VAE × tokenizer × preprocessing, shared by every stage):

    dataset = load_image_text_dataset("path/to/images")   # rows: image (PIL), text (str)
    cache = build_latent_cache(dataset, vae=vae, conditioning=TextConditioning(tokenizer),
                               preprocess=PreprocessSpec(512), cache_root=root)
    batch = cache.batch([(index, epoch), ...])  # latent mean/std (B, C, h, w), input_ids (B, L)
    latents = sample_latents(batch.latent_mean, batch.latent_std, cache.scaling_factor, generators)
"""

from distill.data.build import build_latent_cache
from distill.data.cache import CachedBatch, LatentCache, flip_choice, sample_latents
from distill.data.preprocess import PreprocessSpec, preprocess_image
from distill.data.sources import load_image_text_dataset, streaming_fingerprint

__all__ = [
    "CachedBatch",
    "LatentCache",
    "PreprocessSpec",
    "build_latent_cache",
    "flip_choice",
    "load_image_text_dataset",
    "preprocess_image",
    "sample_latents",
    "streaming_fingerprint",
]
