"""sd-distill: distill a Stable Diffusion teacher into a compact student UNet."""

__version__ = "0.1.0"
