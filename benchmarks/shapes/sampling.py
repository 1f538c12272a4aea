"""The shapes model as the benchmark drives it: load, guided DDIM from captions and noise, judge.

`load(weights, device)` returns `Models`; everything the benchmark needs from the trained model goes
through here, so bench.py and the cross-check do not depend on how training laid out its files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class Models:
    unet: Any  # diffusers UNet2DConditionModel, FP32, on the device
    encode: Callable[[list[str]], torch.Tensor]  # captions -> encoder_hidden_states [B, L, D] (FP32)
    null: str  # the caption of the unconditional branch
    scheduler: Callable[[], Any]  # a fresh DDIM scheduler
    judge_model: Any  # images [-1, 1] (N, 3, 32, 32) -> (dict attr -> logits, features)
    sample_shape: tuple[int, ...]  # (C, H, W)
    guidance: float
    device: str
    source: str


def generate(models: Models, unet: Any, captions: list[str], noise: torch.Tensor, steps: int, guidance: float,
             dtype: torch.dtype = torch.float32, on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Guided DDIM; uncond and cond in one UNet batch (as the SD pipelines do); float32 scheduler math."""
    sched = models.scheduler()
    sched.set_timesteps(steps)
    x = noise.to(models.device, torch.float32)
    with torch.no_grad():
        enc = models.encode([models.null] * len(captions) + list(captions)).to(dtype)
        for i, t in enumerate(sched.timesteps):
            if on_step:
                on_step(i)
            eps = unet(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=enc).sample.float()
            e_u, e_c = eps.chunk(2)
            x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    return x


def judge(models: Models, x: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(attribute -> predicted class, penultimate features) of images in [-1, 1]."""
    with torch.no_grad():
        logits, feats = models.judge_model(x.to(models.device, torch.float32))
    return {k: v.argmax(1).cpu().numpy() for k, v in logits.items()}, feats.float().cpu().numpy()


def load(weights: Path, device: str, seed: int = 0) -> Models:
    """DEV STAND-IN until benchmarks/shapes/model.py lands: seeded random tiny models."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    import render

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                cross_attention_dim=32, norm_num_groups=16).eval().to(device)
    vocab = {w: i + 1 for i, w in enumerate(render.vocabulary())}
    emb = torch.nn.Embedding(len(vocab) + 1, 32).to(device)

    def encode(caps: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(caps), 12, dtype=torch.long)
        for i, c in enumerate(caps):
            for j, w in enumerate(c.split()[:12]):
                ids[i, j] = vocab[w]
        return emb(ids.to(device))

    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.SiLU(), torch.nn.Conv2d(16, 32, 3, 2, 1),
                               torch.nn.SiLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).to(device)
    heads = {k: torch.nn.Linear(32, n).to(device) for k, n in render.ATTRIBUTES.items()}

    def judge_model(x: torch.Tensor):  # type: ignore[no-untyped-def]
        f = conv(x)
        return {k: h(f) for k, h in heads.items()}, f

    def sched() -> DDIMScheduler:
        return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)

    return Models(unet, encode, "", sched, judge_model, (3, 32, 32), 3.0, device, "random (dev stand-in)")
