"""Latents -> the VAE decoder's input: the one piece of arithmetic the torch VAE (`pipeline.decode_raw`) and the
TensorRT VAE (`EngineEncoders.decode`) share, so the two paths cannot drift apart again (the TensorRT path
divided by scaling_factor only and ignored SDXL's latents_mean / latents_std)."""

from __future__ import annotations

from typing import Any

import numpy as np


def vae_input(latents: np.ndarray, vae_config: Any, sdxl: bool) -> np.ndarray:
    """What diffusers' pipelines hand `vae.decode`, in float32: SDXL's pipeline denormalizes with the VAE's
    per-channel `latents_mean` / `latents_std` when both are set (Playground v2.5); otherwise (and always in
    the SD 1.x/2.x pipeline, which ignores them) latents / scaling_factor (+ shift_factor, None in SD/SDXL VAEs).
    """
    z = np.asarray(latents, dtype=np.float32)
    mean, std = getattr(vae_config, "latents_mean", None), getattr(vae_config, "latents_std", None)
    scale = np.float32(vae_config.scaling_factor)
    if sdxl and mean is not None and std is not None:
        shape = (1, -1) + (1,) * (z.ndim - 2)
        return z * np.asarray(std, np.float32).reshape(shape) / scale + np.asarray(mean, np.float32).reshape(shape)
    return z / scale + np.float32(getattr(vae_config, "shift_factor", None) or 0.0)
