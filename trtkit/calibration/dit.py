"""What `trtkit calibrate` does differently for a DiT pipeline folder (FLUX.1, SD3.x): the component it
calibrates (`transformer`), the taps (trtkit/calibration/hooks_dit.py), and the pipeline call.

The statistics, Percentile Quant, SmoothQuant and the file are the UNet's (calibrate.py, stats.py,
percentile.py, smoothquant.py, calibfile.py): per-step tables indexed by the flow-matching step, so
`--percentile 0.5` keeps the first half of the sigmas (the high-noise end), as for the UNet's timesteps.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from trtkit.errors import TrtkitError


def component(model_dir: Path) -> str:
    """"transformer" for a DiT pipeline folder, "unet" otherwise (from model_index.json)."""
    index_path = Path(model_dir) / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        return "unet"
    return "transformer" if "unet" not in index and "transformer" in index else "unet"


def targets(model: Any, precision: str, level: float) -> dict[str, str]:
    """The inputs the DiT Q/DQ pass quantizes (trtkit/graph/patterns_dit.py), INT8 without attention."""
    from trtkit.calibration import hooks_dit

    return hooks_dit.targets(model, level, precision)


def tapped(model: Any, targets: dict[str, str], tap: Any) -> contextlib.AbstractContextManager[None]:
    from trtkit.calibration.hooks_dit import tapped_dit

    return tapped_dit(model, targets, tap)


def call_kwargs(pipe: Any, batch: list[str], negative_prompt: str) -> dict[str, Any]:
    """Prompt arguments of one pipeline call. FLUX.1 is guidance-distilled: no negative prompt (it would
    only be used with true_cfg_scale > 1, which doubles every step); SD3 runs CFG with one, as the UNet."""
    from diffusers import FluxPipeline

    if isinstance(pipe, FluxPipeline):
        return {"prompt": batch}
    return {"prompt": batch, "negative_prompt": [negative_prompt] * len(batch)}


def default_size(pipe: Any) -> int:
    """The pipeline's own default image side (default_sample_size x the VAE factor: 1024 for FLUX.1-dev)."""
    size = getattr(pipe, "default_sample_size", None)
    if size is None:
        raise TrtkitError(f"{type(pipe).__name__} has no default image size; give --height and --width")
    return int(size) * int(getattr(pipe, "vae_scale_factor", 8))


def module_names(model_dir: Path) -> set[str]:
    """Module names of a folder's DiT transformer, built on the meta device (no weights read)."""
    import diffusers
    import torch

    from trtkit.profiles_dit import TRANSFORMER_CLASSES

    cfg_path = Path(model_dir) / "transformer" / "config.json"
    if not cfg_path.is_file():
        raise TrtkitError(f"{model_dir} has no transformer/config.json: not a DiT pipeline folder")
    cfg = json.loads(cfg_path.read_text())
    name = cfg.get("_class_name")
    if name not in TRANSFORMER_CLASSES:
        raise TrtkitError(f"the transformer of {model_dir} is a {name}; trtkit calibrates "
                          f"{' and '.join(TRANSFORMER_CLASSES)}")
    with torch.device("meta"):
        model = getattr(diffusers, name).from_config(cfg)
    return {n for n, _ in model.named_modules()}
