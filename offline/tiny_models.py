"""Stable Diffusion components in miniature, for the offline Fashion-MNIST teachers.

Same classes and block layout as SD v1.4 (AutoencoderKL, UNet2DConditionModel with CrossAttn
down/up blocks and a cross-attention mid block, CLIPTextModel + the real CLIP tokenizer), scaled
down so a teacher trains on 2 CPU cores:

    image (B, 3, 32, 32) --VAE f=4--> latents (B, 4, 8, 8) --UNet, 3 stages: 8 → 4 → 2 px
    caption --CLIP BPE--> ids (B, 77) --random frozen CLIPTextModel--> context (B, 77, D)

The UNet keeps `layers_per_block=2`, so the student builder's `layers_per_block=1` pruning
applies to it exactly as to SD v1.4. The SDXL twin (`tiny_sdxl_unet`) has SDXL's layout: no
attention in the first stage, deeper transformers further down, linear projections, and the
text-time embedding fed by the second text encoder's projected pooled output and six size ids.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from offline.tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE

LATENT_CHANNELS = 4

# SD v1.4's noise schedule (scheduler_config.json of CompVis/stable-diffusion-v1-4).
SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
)


# SD v1.4's own UNet config (4 stages, cross-attention in the first three, two layers per block)
# at toy widths: the module paths, layer pairs and init map of the real model, built in
# milliseconds. Used by the step benchmark's smoke run and the tests.
SD_V1_4_TOY_WIDTHS = {
    "block_out_channels": [32, 32, 64, 64],
    "attention_head_dim": 2,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "sample_size": 8,  # 8 → 4 → 2 → 1 through the four stages
}


def sd_v1_4_toy_config() -> dict:
    from core.families import builtin_config

    return {**builtin_config("sd-v1-4"), **SD_V1_4_TOY_WIDTHS}


def tiny_vae(
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    image_size: int = 32,
) -> AutoencoderKL:
    """An AutoencoderKL with f = 2**(len(block_out_channels) - 1): 3 blocks give f=4, 32 → 8 px."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=norm_num_groups,
        sample_size=image_size,
    )


def tiny_text_encoder(
    seed: int,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    initializer_factor: float = 1.0,
    projection_dim: int | None = None,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A randomly initialised, frozen CLIPTextModel over the real 49,408-token CLIP vocabulary.

    `seed` fixes the weights. `initializer_factor` scales every init std (transformers' CLIP
    init): larger values mix more caption content into every position of the (B, 77, D) output.
    `projection_dim`: a CLIPTextModelWithProjection instead, whose projected pooled output
    (B, projection_dim) is SDXL's `text_embeds` (SDXL's second encoder, OpenCLIP bigG, is one).
    """
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        initializer_factor=initializer_factor,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=projection_dim or hidden_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model_class = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
        model = model_class(config)
    model.requires_grad_(False)
    return model.eval()


def tiny_unet(
    cross_attention_dim: int = 32,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 2,
    attention_head_dim: int = 4,
    norm_num_groups: int = 8,
    sample_size: int = 8,
    use_linear_projection: bool = False,
    plain_stage: Literal["deepest", "first"] = "deepest",
    transformer_layers: tuple[int, ...] | None = None,
    **conditioning: Any,
) -> UNet2DConditionModel:
    """SD's UNet layouts in miniature. `sample_size` is the latent side.

    plain_stage: the one stage without attention: "deepest" is SD v1/v2's layout (CrossAttn down
        blocks then a plain DownBlock2D, mirrored up blocks), "first" is SDXL's.
    use_linear_projection: SD 2.x's and SDXL's transformers (linear in/out projections, not 1×1
        convs). transformer_layers: per stage (the plain stage's entry unused); None: one each.
    conditioning: config entries that make it read a family's conditioning
        (`ModelFamily.unet_conditioning_config`; SD: just `cross_attention_dim`).
    """
    stages = len(block_out_channels)
    attended = ("CrossAttnDownBlock2D",) * (stages - 1)
    if plain_stage == "deepest":
        down, up = (
            attended + ("DownBlock2D",),
            ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (stages - 1),
        )
    else:
        down, up = (
            ("DownBlock2D",) + attended,
            ("CrossAttnUpBlock2D",) * (stages - 1) + ("UpBlock2D",),
        )
    depth = (
        {}
        if transformer_layers is None
        else {"transformer_layers_per_block": list(transformer_layers)}
    )
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        # diffusers' legacy naming, as in SD v1.4's config: this is the number of heads.
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=use_linear_projection,
        **depth,
        **conditioning,
    )


def tiny_sdxl_unet(
    cross_attention_dim: int = 64,
    pooled_text_dim: int = 32,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    transformer_layers: tuple[int, ...] = (1, 1, 2),
    layers_per_block: int = 2,
    attention_head_dim: int = 4,
    time_ids_embed_dim: int = 8,
    norm_num_groups: int = 8,
    sample_size: int = 8,
) -> UNet2DConditionModel:
    """SDXL's UNet layout in miniature (SDXL base: 3 stages, no attention in the first,
    transformer depth [-, 2, 10], `use_linear_projection`, `addition_embed_type="text_time"`).

    cross_attention_dim: both text encoders' hidden widths, concatenated (SDXL: 768 + 1280).
    The added embedding reads the pooled text (B, pooled_text_dim) beside the six size ids, each
    Fourier-embedded to `time_ids_embed_dim` (SDXL: 1280 + 6 × 256 = 2816 inputs).
    """
    from core.families import StableDiffusionXL

    widths = (cross_attention_dim - pooled_text_dim, pooled_text_dim)
    return tiny_unet(
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        use_linear_projection=True,
        plain_stage="first",
        transformer_layers=transformer_layers,
        **StableDiffusionXL().unet_conditioning_config(widths, time_ids_embed_dim),
    )


def training_noise_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """The DDPM forward process SD v1 was trained with; SD 2.x-v trains the same schedule to
    predict v (`prediction_type="v_prediction"`)."""
    return DDPMScheduler(**SD_SCHEDULE, clip_sample=False, prediction_type=prediction_type)


def sampling_scheduler(prediction_type: str = "epsilon") -> PNDMScheduler:
    """SD v1.4's default sampler, as shipped in its pipeline folder."""
    return PNDMScheduler(
        **SD_SCHEDULE,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
