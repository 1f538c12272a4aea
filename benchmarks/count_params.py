"""Weights of the SDXL modules in fp16, counted on the meta device (no download): the memory arithmetic of
docs/runtime.md ("Memory with --engines").

Usage:  python benchmarks/count_params.py
"""

from __future__ import annotations

import json

import torch
from _configs import SDXL_UNET  # benchmarks/ is on sys.path when run as a script
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

# stabilityai/stable-diffusion-xl-base-1.0: text_encoder/, text_encoder_2/, vae/ config.json (the fields that
# decide the parameter count)
TEXT_ENCODER = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
TEXT_ENCODER_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
           block_out_channels=[128, 256, 512, 512],
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    with torch.device("meta"):
        mods = {"unet": UNet2DConditionModel.from_config(SDXL_UNET),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2)),
                "vae": AutoencoderKL.from_config(VAE)}
    out = {}
    for name, m in mods.items():
        n = count(m)
        out[name] = {"params": n, "fp16_GiB": round(n * 2 / 2**30, 3)}
    vae = mods["vae"]
    dec = count(vae.decoder) + count(vae.post_quant_conv)
    out["vae_decoder"] = {"params": dec, "fp16_GiB": round(dec * 2 / 2**30, 3)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
