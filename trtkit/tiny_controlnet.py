"""Tiny ControlNet pipelines (SD 1.5 and SDXL architecture) with seeded random weights, for tests and the
runtime's parity checks; saved with diffusers' own `save_pretrained`, so loading goes through real code.

The ControlNet is `ControlNetModel.from_unet` of the tiny UNet (the UNet's encoder weights copied, as real
ControlNets start), and then its zero-initialised convolutions (the conditioning embedding's `conv_out`,
`controlnet_down_blocks`, `controlnet_mid_block`) are re-drawn: a freshly made ControlNet returns all-zero
residuals, which would make every parity test of the residual path pass whatever the code does.

Several ControlNets are saved as diffusers saves a `MultiControlNetModel`: `controlnet/`, `controlnet_1/`, ...
with `model_index.json` naming `MultiControlNetModel`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from trtkit._files import atomic_dir
from trtkit.errors import TrtkitError
from trtkit.tiny import clip_tokenizer, save_into, tiny_config

ARCHS = ("sd15", "sdxl")
# 4 widths: three stride-2 convs take the image to the latent size (the VAE factor 8).
COND_EMBED_CHANNELS = (16, 16, 32, 32)


def sd15_unet_config() -> dict[str, Any]:
    """The tiny SDXL UNet's blocks with SD 1.x's conditioning: one text encoder's hidden states (width 32),
    no added text/time embeddings, convolutional proj_in/out."""
    unet = dict(tiny_config()["unet"])
    for k in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
              "transformer_layers_per_block"):
        unet.pop(k, None)
    unet.update(cross_attention_dim=32, use_linear_projection=False, attention_head_dim=4)  # head size 16
    return unet


def _redraw_zero_convs(controlnet: Any) -> None:
    """Give the zero-initialised convs PyTorch's default Conv2d initialisation (from the global seed)."""
    zero = [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
            controlnet.controlnet_mid_block]
    for conv in zero:
        conv.reset_parameters()


def make_tiny_controlnet_pipeline(out_dir: Path | str, arch: str = "sdxl", n_controlnets: int = 1,
                                  seed: int = 0) -> Path:
    """Write a tiny StableDiffusion(XL)ControlNetPipeline folder with `n_controlnets` ControlNets (weights
    drawn from `seed`; each ControlNet differs)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        EulerDiscreteScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if arch not in ARCHS:
        raise TrtkitError(f"arch {arch!r} is not one of {', '.join(ARCHS)}")
    if n_controlnets < 1:
        raise TrtkitError(f"n_controlnets must be at least 1, not {n_controlnets}")
    cfg = tiny_config()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tok_dir = tmp / "_tok"
        tokenizer, ids = clip_tokenizer(tok_dir)
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**(cfg["unet"] if arch == "sdxl" else sd15_unet_config()))
        vae = AutoencoderKL(**cfg["vae"])
        te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"], **ids))
        nets = []
        for _ in range(n_controlnets):
            cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_EMBED_CHANNELS)
            _redraw_zero_convs(cn)
            nets.append(cn)
        controlnet = nets[0] if n_controlnets == 1 else nets  # a list: the pipeline wraps a MultiControlNetModel
        scheduler = EulerDiscreteScheduler(**cfg["scheduler"])
        if arch == "sdxl":
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"], **ids))
            pipe = StableDiffusionXLControlNetPipeline(
                vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer,
                unet=unet, controlnet=controlnet, scheduler=scheduler, add_watermarker=False)
        else:
            pipe = StableDiffusionControlNetPipeline(
                vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, controlnet=controlnet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        save_into(pipe, tmp)
        shutil.rmtree(tok_dir)
    return out_dir
