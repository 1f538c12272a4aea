"""Calibrating the ControlNets of a ControlNet pipeline beside its UNet (trtkit/calibration/calibrate.py).

The pipeline runs as users run it, with a conditioning image: a deterministic synthetic one (white edges of
a rendered disc and rectangle on black, the look of a Canny control image), made with numpy so no data set is
needed. Each ControlNet gets its own hooks and its own calibration file beside the UNet's, named after its
folder: `calib.json` (UNet), `calib.controlnet.json`, `calib.controlnet_1.json`, ... The UNet and a ControlNet
share module names (`down_blocks.0...`), so one file could not hold both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def conditioning_image(height: int, width: int) -> Any:
    """A PIL RGB image: edges (gradient magnitude above a threshold) of a disc and a rectangle."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((y - 0.4 * height) ** 2 + (x - 0.35 * width) ** 2) < (0.22 * min(height, width)) ** 2
    rect = (np.abs(y - 0.65 * height) < 0.15 * height) & (np.abs(x - 0.7 * width) < 0.2 * width)
    shape = (disc | rect).astype(np.float32)
    gy, gx = np.gradient(shape)
    edges = (np.hypot(gx, gy) > 0.25).astype(np.uint8) * 255
    return Image.fromarray(np.stack([edges] * 3, axis=-1), mode="RGB")


def calib_path(out: Path, name: str) -> Path:
    """`calib.json` + `controlnet` -> `calib.controlnet.json`."""
    return out.with_name(f"{out.stem}.{name}{out.suffix}")


def model_info(model_dir: Path, name: str) -> dict[str, Any]:
    from trtkit.calibfile import unet_config_hash

    cfg = json.loads((Path(model_dir) / name / "config.json").read_text())
    return {"source": str(Path(model_dir).resolve()), "class": cfg.get("_class_name", "ControlNetModel"),
            "component": name, "config_hash": unet_config_hash(cfg)}


def nets(pipe: Any) -> list[Any]:
    """The pipeline's ControlNets in folder order (one, or a MultiControlNetModel's)."""
    cn = getattr(pipe, "controlnet", None)
    if cn is None:
        return []
    return list(getattr(cn, "nets", [cn]))


def pipeline_kwargs(names: list[str], height: int, width: int) -> dict[str, Any]:
    """The pipeline call's conditioning image(s): one per ControlNet."""
    if not names:
        return {}
    img = conditioning_image(height, width)
    return {"image": img if len(names) == 1 else [img] * len(names)}
