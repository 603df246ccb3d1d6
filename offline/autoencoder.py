"""`kind: autoencoder`: train the pipeline's VAE (an `AutoencoderKL`) on the data's pixels.

The offline world trains its teachers from nothing, as SD v1 was: first the autoencoder, then the
UNet on its latents. This is the first of those stages, on the engine's loop like every other
(guard, accumulation, checkpoints, resume, logs). Registered through the `sd_distill.stage_kinds`
entry point, as any other package's kind would be.

Loss: L1 reconstruction + kl_weight · KL(posterior ‖ N(0, I)), both means per element, so
`kl_weight` does not depend on image or latent size. The KL term keeps the latent space smooth,
which matters more for a diffusion model trained for minutes than the last bit of sharpness.
Each sample's posterior draw comes from the generator of (seed, stage, stream position).

At the stage's end the latent scaling factor is measured: 1 / std of one posterior draw per
training image (Rombach et al. 2022, LDM appendix; SD v1's 0.18215 was measured the same way),
stored in the VAE's config, so the UNet stages after this one see unit-variance latents.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from pydantic import Field
from torch import Tensor, nn

from distill.kinds import KindOptions, StageKind, StageRows, StageSetup
from distill.step_randomness import sample_generator
from distill.taps import FeatureTaps, unwrap_model


class AutoencoderOptions(KindOptions):
    kl_weight: Annotated[float, Field(ge=0.0)] = 1e-3
    # Images per VAE call when the scaling factor is measured at the stage's end.
    scaling_batch_size: Annotated[int, Field(gt=0)] = 256


class AutoencoderKind(StageKind):
    name: ClassVar[str] = "autoencoder"
    Options: ClassVar[type[KindOptions]] = AutoencoderOptions
    component: ClassVar[str] = "vae"
    model_class: ClassVar[type] = AutoencoderKL

    def __init__(self, setup: StageSetup) -> None:
        super().__init__(setup)
        self.images = setup.data.images()
        self.taps: FeatureTaps | None = None

    @property
    def rows(self) -> StageRows:
        return self.images

    def start(self, model: nn.Module) -> None:
        # The posterior's moments (B, 2·C, h, w), read from the forward that reconstructs (a
        # wrapper such as DDP only syncs gradients of its own forward, not of `.encode`).
        vae = unwrap_model(model)
        self.taps = FeatureTaps(model, ["quant_conv" if vae.quant_conv is not None else "encoder"])
        self.taps.__enter__()

    def loss_step(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor, dict]:
        setup, options = self.setup, self.setup.options
        pixels = batch["pixels"].to(setup.device, setup.precision.weights)  # (B, 3, R, R)
        generators = [sample_generator(setup.seed, setup.index, int(p)) for p in batch["positions"]]
        self.taps.clear()
        reconstruction = model(pixels, sample_posterior=True, generator=generators).sample
        (moments,) = self.taps.features.values()
        posterior = DiagonalGaussianDistribution(moments.float())
        self.taps.clear()
        l1 = (reconstruction.float() - pixels.float()).abs().mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        return l1 + options.kl_weight * kl, {"l1": l1, "kl": kl}

    @torch.no_grad()
    def finish(self, model: nn.Module) -> nn.Module:
        """Store the measured latent scaling factor in the VAE's config."""
        vae: AutoencoderKL = model
        generator = torch.Generator().manual_seed(self.setup.seed)
        draws = []
        size = self.setup.options.scaling_batch_size
        for start in range(0, len(self.images), size):
            indices = range(start, min(start + size, len(self.images)))
            pixels = self.images.micro_batch([(i, 0) for i in indices])["pixels"]
            posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=generator, dtype=vae.dtype)
            draws.append(posterior.mean + posterior.std * noise.to(vae.device))
        vae.register_to_config(scaling_factor=float(1.0 / torch.cat(draws).std()))
        return vae

    def close(self) -> None:
        if self.taps is not None:
            self.taps.__exit__(None, None, None)
            self.taps = None
