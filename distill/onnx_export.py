"""`distill export --format onnx`: a finished student as a pipeline ONNX Runtime runs.

The folder is the layout diffusers' `OnnxStableDiffusionPipeline` loads (`from_pretrained(out)`,
`provider="CPUExecutionProvider"`):

    out/text_encoder/model.onnx   input_ids (B, 77) int32 -> last_hidden_state, pooler_output
    out/unet/model.onnx           sample (B, 4, h, w), timestep (1,), encoder_hidden_states
                                  (B, 77, D) -> out_sample; B dynamic, h and w the model's own
    out/vae_decoder/model.onnx    latent_sample (B, 4, h, w) -> sample (B, 3, H, W)
    out/vae_encoder/model.onnx    sample (B, 3, H, W) -> latent_sample (the distribution's mode)
    out/tokenizer/, out/scheduler/, out/model_index.json

Why torch.onnx and not optimum-onnx: optimum-onnx 0.1 (the newest release) pins transformers
< 4.58 and cannot be installed beside transformers 5, which the toolkit needs. The dynamo
exporter (torch ≥ 2.9) traces each component once, batch dimension dynamic.

diffusers 0.42's ONNX pipeline scales latents by SD v1's 0.18215 whatever the VAE's
`scaling_factor` is; the exported VAE halves carry the correction (`_VaeDecoder`), so a VAE with
another factor (the offline world's) decodes right. SDXL has no ONNX pipeline in diffusers (its
ORT pipeline lives in optimum): `export_onnx` refuses it in one line.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn

from core.errors import UserInputError

ONNX_PIPELINE_SCALE = 0.18215  # diffusers' OnnxStableDiffusionPipeline, hard-coded
EXTERNAL_DATA_BYTES = 1 << 30  # above this, weights go to model.onnx.data (protobuf's 2 GB cap)
OPSET = 18


class _TextEncoder(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.encoder(input_ids.long(), return_dict=True)  # (B, 77) int32 in
        return output.last_hidden_state, output.pooler_output  # (B, 77, D), (B, D)


class _UNet(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        # timestep (1,) float32 is broadcast over the batch by the UNet itself.
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _VaeDecoder(nn.Module):
    """latents × (0.18215 / scaling_factor) first: the ONNX pipeline divides by 0.18215."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.correction = ONNX_PIPELINE_SCALE / vae.config.scaling_factor

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample * self.correction, return_dict=False)[0]


class _VaeEncoder(nn.Module):
    """The latent distribution's mode, scaled so that the pipeline's × 0.18215 gives the VAE's
    own scaled latents (deterministic: no sampling inside the graph)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.correction = vae.config.scaling_factor / ONNX_PIPELINE_SCALE

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample, return_dict=False)[0].mode() * self.correction


def check_exportable(pipeline_class: str, unet_config: dict[str, Any]) -> None:
    """One line of why not, before anything is loaded or deleted (`distill export` reads both
    from the run's `student_pipeline/`)."""
    if pipeline_class != "StableDiffusionPipeline":
        raise UserInputError(
            f"ONNX export covers SD v1/v2 pipelines; {pipeline_class} has no ONNX pipeline in "
            "diffusers"
        )
    if unet_config.get("time_cond_proj_dim") is not None:
        raise UserInputError(
            "a few-step student reads its guidance through an embedding, which diffusers' ONNX "
            "pipeline does not pass; export it as a diffusers folder"
        )


def export_onnx(pipeline: Any, out: str | Path, *, progress: bool = True) -> Path:
    """Write `pipeline` (a loaded fp32 `StableDiffusionPipeline`) to `out` as the ONNX folder
    described above; returns `out`."""
    check_exportable(type(pipeline).__name__, dict(pipeline.unet.config))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet, vae, text_encoder = pipeline.unet.eval(), pipeline.vae.eval(), pipeline.text_encoder
    # Examples hold 2 of everything: export specialises a size-1 dimension to a constant.
    batch = torch.export.Dim("batch", max=64)
    tokens = pipeline.tokenizer.model_max_length
    latent = unet.config.sample_size
    pixels = latent * pipeline.vae_scale_factor
    channels = unet.config.in_channels
    width = text_encoder.config.hidden_size
    parts = [
        (
            "text_encoder",
            _TextEncoder(text_encoder.eval()),
            (torch.zeros(2, tokens, dtype=torch.int32),),
            ["input_ids"],
            ["last_hidden_state", "pooler_output"],
            ({0: batch},),
        ),
        (
            "unet",
            _UNet(unet),
            (
                torch.randn(2, channels, latent, latent),
                torch.tensor([500.0]),
                torch.randn(2, tokens, width),
            ),
            ["sample", "timestep", "encoder_hidden_states"],
            ["out_sample"],
            ({0: batch}, None, {0: batch}),
        ),
        (
            "vae_decoder",
            _VaeDecoder(vae),
            (torch.randn(2, vae.config.latent_channels, latent, latent),),
            ["latent_sample"],
            ["sample"],
            ({0: batch},),
        ),
        (
            "vae_encoder",
            _VaeEncoder(vae),
            (torch.randn(2, 3, pixels, pixels),),
            ["sample"],
            ["latent_sample"],
            ({0: batch},),
        ),
    ]
    for name, module, example, inputs, outputs, dynamic in parts:
        start = time.perf_counter()
        _export_one(module, example, out / name, inputs, outputs, dynamic)
        if progress:
            print(f"onnx export: {name} in {time.perf_counter() - start:.1f} s", flush=True)
    pipeline.tokenizer.save_pretrained(out / "tokenizer")
    pipeline.scheduler.save_pretrained(out / "scheduler")
    model_index = {
        "_class_name": "OnnxStableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        **{name: ["diffusers", "OnnxRuntimeModel"] for name, *_ in parts},
        "tokenizer": ["transformers", type(pipeline.tokenizer).__name__],
        "scheduler": ["diffusers", type(pipeline.scheduler).__name__],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return out


def load_onnx_pipeline(folder: str | Path) -> Any:
    """The exported folder in diffusers' `OnnxStableDiffusionPipeline` on the CPU.

    `provider_options={}`: diffusers 0.42 passes an empty options list beside its one provider,
    which onnxruntime 1.32 rejects (it prints an "EP Error" and retries); one dict per provider is
    what it expects."""
    from diffusers import OnnxStableDiffusionPipeline

    return OnnxStableDiffusionPipeline.from_pretrained(
        str(folder), provider="CPUExecutionProvider", provider_options={}
    )


def onnx_image_size(latent_size: int) -> int:
    """The `height`/`width` to ask the ONNX pipeline for: it makes latents of `height // 8`
    whatever the VAE's factor (the offline world's VAE has 4 pixels per latent: its 32 px images
    come from `height=64`)."""
    return latent_size * 8


def _export_one(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    folder: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic: tuple[dict[int, Any] | None, ...],
) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    with torch.no_grad():
        torch.onnx.export(
            module,
            example,
            str(folder / "model.onnx"),
            input_names=inputs,
            output_names=outputs,
            dynamo=True,
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            external_data=size > EXTERNAL_DATA_BYTES,
            verbose=False,
        )
