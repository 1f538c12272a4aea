"""ControlNet export (SD 1.x/2.x and SDXL), beside trtkit/exporter.py: loading, the wrappers and the axes.

Components are named after the folders diffusers writes: `controlnet` (the only or the first ControlNet),
`controlnet_1`, `controlnet_2`, ... for a MultiControlNetModel. Each ControlNet has its own weights, so its
own ONNX and engine; the runtime adds their residuals (diffusers' MultiControlNetModel does the same sum).

* `controlnet`: inputs sample, timestep, encoder_hidden_states, controlnet_cond (the conditioning image at
  the image size), conditioning_scale (a (1,) input, so the runtime sets it without a rebuild) and, for SDXL,
  text_embeds, time_ids; outputs down_block_res_samples_0..N-1 and mid_block_res_sample (already scaled).
* `unet` of a folder with a ControlNet: the UNet's inputs, then the same residual names as inputs, added to
  the skip connections (diffusers' `down_block_additional_residuals` / `mid_block_additional_residual`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trtkit.errors import TrtkitError
from trtkit.profiles_controlnet import COND, SCALE, ControlNetSpec


def controlnet_folders(model_dir: Path | str) -> list[str]:
    """`controlnet`, `controlnet_1`, ... present in a pipeline folder (diffusers' MultiControlNetModel layout)."""
    root = Path(model_dir)
    out = []
    while (root / (name := "controlnet" if not out else f"controlnet_{len(out)}") / "config.json").is_file():
        out.append(name)
    return out


def is_controlnet(component: str) -> bool:
    return component == "controlnet" or (component.startswith("controlnet_") and component[11:].isdigit())


def spec_of(model_dir: Path | str, component: str) -> ControlNetSpec | None:
    """The residual layout for a ControlNet component or for the UNet of a ControlNet folder; None otherwise."""
    root = Path(model_dir)
    if not is_controlnet(component) and not root.is_dir():
        return None  # a hub id: its UNet exports as usual
    folders = controlnet_folders(root) if root.is_dir() else []
    if is_controlnet(component):
        if component not in folders:
            have = f"it has {', '.join(folders)}" if folders else "it has no controlnet/ folder"
            raise TrtkitError(f"{root} has no {component}/ ControlNet ({have})")
        return ControlNetSpec.from_folder(root / component)
    if component == "unet" and folders:
        return ControlNetSpec.from_folder(root / folders[0])
    return None


def load(model_dir: Path | str, component: str, dtype: Any = None) -> Any:
    import torch
    from diffusers import ControlNetModel

    from trtkit._quiet import quiet_loading

    spec_of(model_dir, component)  # a clear error for a missing folder
    try:
        with quiet_loading():
            return ControlNetModel.from_pretrained(str(model_dir), subfolder=component,
                                                   torch_dtype=dtype or torch.float32).eval()
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrtkitError(f"cannot load {component} from {model_dir}: {first}") from e


def output_names(spec: ControlNetSpec) -> list[str]:
    return spec.names


def controlnet_wrapper(module: Any, sdxl: bool) -> Any:
    import torch

    class ControlNetWrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.controlnet = module

        def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale,
                    text_embeds=None, time_ids=None):
            added = {"text_embeds": text_embeds, "time_ids": time_ids} if sdxl else None
            down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond,
                                        conditioning_scale=conditioning_scale, added_cond_kwargs=added,
                                        return_dict=False)
            return (*down, mid)

    return ControlNetWrap()


def unet_wrapper(module: Any, sdxl: bool, spec: ControlNetSpec) -> Any:
    import torch

    n_added = 2 if sdxl else 0
    n_res = len(spec.residuals)

    class UNetResidualWrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = module

        def forward(self, sample, timestep, encoder_hidden_states, *rest):
            if len(rest) != n_added + n_res:
                raise TypeError(f"expected {n_added + n_res} inputs after encoder_hidden_states, got {len(rest)}")
            added = {"text_embeds": rest[0], "time_ids": rest[1]} if sdxl else None
            res = rest[n_added:]
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                             down_block_additional_residuals=tuple(res[:-1]), mid_block_additional_residual=res[-1],
                             return_dict=False)[0]

    return UNetResidualWrap()


def check_inputs(shapes: dict[str, Any], component: str, sdxl: bool, spec: ControlNetSpec) -> dict[str, Any]:
    """The profile's inputs in the wrapper's order; an input the model does not take is a one-line error."""
    added = ["text_embeds", "time_ids"] if sdxl else []
    base = ["sample", "timestep", "encoder_hidden_states"]
    order = [*base, COND, SCALE, *added] if is_controlnet(component) else [*base, *added, *spec.names]
    extra = set(shapes) - set(order)
    if extra:
        raise TrtkitError(f"input {sorted(extra)[0]!r} is not an input of this {component}; "
                          f"its inputs are: {', '.join(order)}")
    missing = [k for k in order if k not in shapes]
    if missing:
        raise TrtkitError(f"the shapes give nothing for input {missing[0]!r} of this {component}")
    return {k: shapes[k] for k in order}


def dynamic_axes(shapes: dict[str, Any], outputs: list[str], component: str) -> dict[str, dict[int, str]]:
    """Batch and spatial axes dynamic; the conditioning image's spatial axes are the image's (8x the latent's)."""
    axes: dict[str, dict[int, str]] = {}
    for name, r in shapes.items():
        if name in ("timestep", SCALE):
            continue
        a: dict[int, str] = {0: "batch"}
        if len(r.opt) == 4:
            a.update({2: "image_height", 3: "image_width"} if name == COND else
                     {2: f"{name}_height", 3: f"{name}_width"} if name not in ("sample",) else
                     {2: "height", 3: "width"})
        if name == "encoder_hidden_states":
            a[1] = "tokens"
        axes[name] = a
    for o in outputs:  # the UNet's noise_pred keeps the plain UNet's axis names
        axes[o] = {0: "batch", 2: "out_height", 3: "out_width"} if o == "noise_pred" else \
            {0: "batch", 2: f"{o}_height", 3: f"{o}_width"}
    return axes
