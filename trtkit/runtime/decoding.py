"""Latents -> image on the diffusers pipeline's torch VAE (`decode`, `decode_raw`), and the VAE-input arithmetic
(`vae_input`) it shares with the TensorRT VAE (`pipeline.EngineEncoders.decode`), so the two paths cannot drift
apart again (the TensorRT path divided by scaling_factor only and ignored SDXL's latents_mean / latents_std)."""

from __future__ import annotations

from typing import Any

import numpy as np

from trtkit.runtime.torch_stages import is_sdxl


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


def decode(pipe: Any, latents: np.ndarray, output_type: str = "pil", dtype: Any = None) -> tuple[Any, list | None]:
    """(images, nsfw_content_detected) as diffusers' pipelines give them: the VAE, then, for a non-latent output,
    SD's safety checker (flagged images black; `dtype` is the prompt embeddings') or SDXL's invisible watermark
    when the pipeline has them, then postprocess."""
    img = decode_raw(pipe, latents)
    nsfw = None
    if output_type == "latent":
        return img, None
    if is_sdxl(pipe) and getattr(pipe, "watermark", None) is not None:
        img = pipe.watermark.apply_watermark(img)
    elif not is_sdxl(pipe) and getattr(pipe, "safety_checker", None) is not None:
        import torch

        with torch.no_grad():
            img, nsfw = pipe.run_safety_checker(img, img.device, dtype or pipe.text_encoder.dtype)
    return pipe.image_processor.postprocess(img, output_type=output_type, do_denormalize=None if nsfw is None
                                            else [not n for n in nsfw]), nsfw


def decode_raw(pipe: Any, latents: np.ndarray) -> Any:
    """The VAE's output in [-1, 1] (a torch tensor), before any postprocessing."""
    import torch

    vae = pipe.vae
    dtype = vae.dtype
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)  # the fp16 SDXL VAE overflows; diffusers upcasts it the same way
        dtype = torch.float32
    # the arithmetic in float32 on the host, then the VAE dtype (diffusers does it in the latents' dtype)
    z = torch.from_numpy(vae_input(latents, vae.config, is_sdxl(pipe))).to(vae.device, dtype)
    with torch.no_grad():
        return vae.decode(z, return_dict=False)[0]
