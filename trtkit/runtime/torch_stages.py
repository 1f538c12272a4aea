"""The stages that run on the diffusers pipeline's own torch modules, before the loop: load the folder (only the
modules no engine replaces), text -> UNet conditioning as diffusers' pipelines make it, and the seeded draws
(initial latents, ancestral noise). The VAE side is decoding.py; the loop and its executors pipeline.py."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from trtkit._quiet import quiet_loading
from trtkit.errors import TrtkitError
from trtkit.runtime.executors import LoopShape
from trtkit.runtime.schedulers import StepTables


def default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def load_pipeline(model_dir: Path, device: str, engines: Iterable[str] = ()) -> Any:
    """The diffusers pipeline with only the torch modules the runtime uses on `device`: modules that `engines`
    (names of plans, components.ENGINE_NAMES) replace are not loaded (UNet, text encoders) or stay on the CPU
    (a replaced VAE; its config is read), so the GPU holds no second copy of them (finding 6)."""
    import torch
    from diffusers import DiffusionPipeline

    from trtkit.runtime.components import (
        engine_modules,
        modules_not_loaded,
        modules_on_device,
        pipeline_modules,
    )

    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise TrtkitError(f"{model_dir} is not a diffusers pipeline folder (no model_index.json)")
    dtype = torch.float16 if device == "cuda" else torch.float32
    try:
        taken = engine_modules(engines, pipeline_modules(json.loads((model_dir / "model_index.json").read_text())))
    except ValueError as e:
        raise TrtkitError(f"{model_dir / 'model_index.json'} is not valid JSON: {e}") from e
    skip = {m: None for m in modules_not_loaded(taken)}
    try:
        with quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(str(model_dir), dtype=dtype, **skip)
    except Exception as e:
        raise TrtkitError(f"cannot load the pipeline in {model_dir}: {str(e).splitlines()[0]}") from e
    pipe.set_progress_bar_config(disable=True)
    if not taken:
        return pipe.to(device)
    present = [m for m in ("unet", "text_encoder", "text_encoder_2", "vae") if getattr(pipe, m, None) is not None]
    for m in modules_on_device(present, taken):
        getattr(pipe, m).to(device)
    return pipe


def unet_config(pipe: Any, model_dir: Path | None = None) -> Any:
    """The UNet's config: from the module, or from its folder when an engine replaced it (not loaded)."""
    if getattr(pipe, "unet", None) is not None:
        return pipe.unet.config
    from diffusers import UNet2DConditionModel
    from diffusers.configuration_utils import FrozenDict

    folder = Path(model_dir or pipe.config._name_or_path)
    return FrozenDict(UNet2DConditionModel.load_config(str(folder), subfolder="unet"))


def is_sdxl(pipe: Any, config: Any = None) -> bool:
    return getattr(config if config is not None else pipe.unet.config, "addition_embed_type", None) == "text_time"


def encode(pipe: Any, prompt: str | list[str], negative_prompt: str | list[str] | None, cfg: bool,
           height: int, width: int, device: str, unet_cfg: Any = None) -> tuple[dict[str, Any], LoopShape]:
    """The UNet conditioning, [uncond; cond] on the batch axis when `cfg`, as the diffusers pipelines make it."""
    import torch

    unet_cfg = unet_cfg if unet_cfg is not None else pipe.unet.config
    with torch.no_grad():
        if is_sdxl(pipe, unet_cfg):
            pe, npe, pooled, npooled = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=cfg,
                                                         negative_prompt=negative_prompt or None)
            b = pe.shape[0]
            tid = torch.tensor([[height, width, 0, 0, height, width]] * b, dtype=pe.dtype, device=pe.device)
            cond = {"encoder_hidden_states": torch.cat([npe, pe]) if cfg else pe,
                    "text_embeds": torch.cat([npooled, pooled]) if cfg else pooled,
                    "time_ids": torch.cat([tid, tid]) if cfg else tid}
            pooled_dim, tdim = pooled.shape[-1], 6
        else:
            pe, npe = pipe.encode_prompt(prompt, device, 1, cfg, negative_prompt=negative_prompt or None)
            b = pe.shape[0]
            cond = {"encoder_hidden_states": torch.cat([npe, pe]) if cfg else pe}
            pooled_dim, tdim = None, None
    f = pipe.vae_scale_factor
    shape = LoopShape(batch=b, latent_channels=unet_cfg.in_channels, latent_height=height // f,
                      latent_width=width // f, cfg=cfg, text_len=pe.shape[1], text_dim=pe.shape[2],
                      pooled_dim=pooled_dim, time_ids_dim=tdim)
    return cond, shape


def initial_latents(shape: LoopShape, tables: StepTables, seed: int) -> np.ndarray:
    """Gaussian latents from a CPU torch generator (as diffusers' randn_tensor draws them), times
    the scheduler's init_noise_sigma."""
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(shape.latent, generator=g, dtype=torch.float32).numpy()
    return x * np.float32(tables.init_noise_sigma)


def seeded_draws(shape: LoopShape, tables: StepTables, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Initial latents, then each step's ancestral noise, from one CPU generator: the order in which diffusers draws
    from `generator=torch.Generator().manual_seed(seed)` (prepare_latents, then each step()), so `--seed S` gives
    diffusers' image for seed S with euler_a too (the noise used to come from a second generator seeded S + 1)."""
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(shape.latent, generator=g, dtype=torch.float32).numpy() * np.float32(tables.init_noise_sigma)
    if not tables.uses_noise:
        return x, None
    return x, np.stack([torch.randn(shape.latent, generator=g, dtype=torch.float32).numpy()
                        for _ in range(tables.steps)])
