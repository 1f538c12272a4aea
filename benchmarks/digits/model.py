"""The digits denoiser: a small class-conditional diffusers UNet2DConditionModel on scikit-learn's digits.

The class (0-9, or 10 = "no class" for classifier-free guidance) is a learned embedding fed to the UNet's
cross-attention as a one-token `encoder_hidden_states`, so the UNet has the same module kinds as SDXL's
(conv resnets, Transformer2D blocks with attn1/attn2/ff, proj_in/proj_out) and the calibration rules apply.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "weights"
SIZE = 8
NULL_CLASS = 10
EMB_DIM = 32

UNET_CONFIG = dict(
    sample_size=SIZE, in_channels=1, out_channels=1,
    block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),  # diffusers' name for the head count: head size 16 everywhere
    cross_attention_dim=EMB_DIM, norm_num_groups=16, use_linear_projection=True,
)


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**UNET_CONFIG)


def make_scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                         set_alpha_to_one=True, prediction_type="epsilon")


def digits_images() -> tuple[torch.Tensor, np.ndarray]:
    """sklearn digits (1797 x 8x8, 0..16) at their native 8x8, scaled to [-1, 1].

    Native size rather than upsampled: 16x16 costs 4x the CPU time (0.6 s per training step on this
    shared 2-core machine) for no extra information."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    return (x * 2 - 1).clamp(-1, 1), d.target


def load_model() -> tuple[UNet2DConditionModel, torch.nn.Embedding]:
    if not (WEIGHTS / "unet" / "config.json").is_file():
        raise SystemExit(f"no trained weights in {WEIGHTS}; run benchmarks/digits/train.py first")
    unet = UNet2DConditionModel.from_pretrained(WEIGHTS / "unet").eval()
    emb = torch.nn.Embedding(NULL_CLASS + 1, EMB_DIM)
    from safetensors.torch import load_file

    emb.load_state_dict(load_file(str(WEIGHTS / "class_embedding.safetensors")))
    return unet, emb.eval()
