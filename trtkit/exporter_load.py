"""Loading one diffusers/transformers component from a folder for export, and which family's exporter
(UNet/VAE/CLIP here, ControlNet in exporter_controlnet.py, DiT and T5 in exporter_dit.py) takes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trtkit._quiet import quiet_loading
from trtkit.errors import TrtkitError
from trtkit.profiles import COMPONENTS, DIT_COMPONENTS, ModelDims


def is_local(model_dir: Path | str) -> bool:
    return Path(model_dir).exists()


def load_component(model_dir: Path | str, component: str, dtype: Any = None) -> Any:
    """Load one diffusers/transformers component from a folder (or a hub id where a network exists)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if controlnet_exporter().is_controlnet(component):
        return controlnet_exporter().load(model_dir, component, dtype)
    if component not in (*COMPONENTS, *DIT_COMPONENTS):
        raise TrtkitError(f"unknown component {component!r}; expected one of "
                          f"{', '.join((*COMPONENTS, *DIT_COMPONENTS, 'controlnet'))}")
    root = Path(model_dir)
    if not is_local(root) and ("/" not in str(model_dir) or str(model_dir).startswith((".", "/"))):
        raise TrtkitError(f"model folder {model_dir} does not exist")
    if is_dit(model_dir, component):
        from trtkit import exporter_dit

        return exporter_dit.load(model_dir, component, is_t5(model_dir, component), dtype)
    dtype = dtype or torch.float32
    sub = {"unet": "unet", "vae_decoder": "vae", "text_encoder": "text_encoder",
           "text_encoder_2": "text_encoder_2"}[component]
    if is_local(root) and not (root / sub).is_dir():
        if component == "unet" and (root / "config.json").is_file():
            sub = ""  # a lone UNet folder
        else:
            raise TrtkitError(f"{root} has no {sub}/ folder: is it a diffusers pipeline folder?")
    kw = {"subfolder": sub} if sub else {}
    try:
        with quiet_loading():
            if component == "unet":
                return UNet2DConditionModel.from_pretrained(str(model_dir), torch_dtype=dtype, **kw).eval()
            if component == "vae_decoder":
                return AutoencoderKL.from_pretrained(str(model_dir), torch_dtype=dtype, **kw).eval()
            from transformers import CLIPTextModel, CLIPTextModelWithProjection

            cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
            return cls.from_pretrained(str(model_dir), torch_dtype=dtype, **kw).eval()
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrtkitError(f"cannot load {component} from {model_dir}: {first}") from e


def model_dims(model_dir: Path | str) -> ModelDims:
    return ModelDims.from_folder(model_dir) if is_local(model_dir) else ModelDims()


def controlnet_exporter() -> Any:
    from trtkit import exporter_controlnet  # ControlNet components and the residual-input UNet

    return exporter_controlnet


def is_t5(model_dir: Path | str, component: str) -> bool:
    from trtkit.profiles_dit import is_t5

    return component == "text_encoder_3" or (component.startswith("text_encoder") and is_t5(model_dir, component))


def is_dit(model_dir: Path | str, component: str) -> bool:
    """Components whose shapes, wrapper and loading live in trtkit/exporter_dit.py and profiles_dit.py."""
    return component in DIT_COMPONENTS or is_t5(model_dir, component)
