"""Training data: image/text sources, preprocessing, and the on-disk latent + text-embedding cache.

Typical use (one cache per dataset × teacher × preprocessing, shared by every stage and run):

    dataset = load_image_text_dataset("path/to/images")   # rows: image (PIL), text (str)
    cache = build_latent_cache(dataset, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                               preprocess=PreprocessSpec(512), cache_root=root)
    item = cache[i]        # latent_mean, latent_std (C, h, w); text_embedding (L, D)
    latents = sample_latents(mean, std, cache.scaling_factor, generator)   # per training step
"""

from distill.data.cache import LatentCache, build_latent_cache, flip_choice, sample_latents
from distill.data.preprocess import PreprocessSpec, preprocess_image
from distill.data.sources import load_image_text_dataset, streaming_fingerprint

__all__ = [
    "LatentCache",
    "PreprocessSpec",
    "build_latent_cache",
    "flip_choice",
    "load_image_text_dataset",
    "preprocess_image",
    "sample_latents",
    "streaming_fingerprint",
]
