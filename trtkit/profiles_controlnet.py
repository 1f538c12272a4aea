"""Shapes of a ControlNet and of the UNet that takes its residuals, from the profile table (trtkit/profiles.py).

A ControlNet reads the UNet's inputs plus the conditioning image at the *image* size (sdxl-1024:
Bx3x1024x1024) and a conditioning scale, and returns one residual per UNet skip connection plus one for the
mid block. The residuals' channels and down-scaling come from the UNet's block layout, which the profile
does not know: `ControlNetSpec` is read from the model's config at export and stored in the ONNX metadata
(`trtkit.controlnet`), so quantize and build rebuild the shapes without the model folder.

Batch: diffusers runs the ControlNet on the same (CFG-doubled) batch as the UNet, so both take the UNet's
batch range.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from trtkit.errors import TrtkitError
from trtkit.profiles import InputShapes, ModelDims, Profile, ShapeRange

META_CONTROLNET = "trtkit.controlnet"  # JSON of ControlNetSpec, on a ControlNet and on a residual-input UNet
COND = "controlnet_cond"
SCALE = "conditioning_scale"
MID = "mid_block_res_sample"


def down_name(i: int) -> str:
    return f"down_block_res_samples_{i}"


@dataclass(frozen=True)
class ControlNetSpec:
    """Per residual (in diffusers' order, the mid block's last): name, channels, down-scaling from the latent."""

    residuals: tuple[tuple[str, int, int], ...]
    conditioning_channels: int = 3

    @property
    def names(self) -> list[str]:
        return [r[0] for r in self.residuals]

    @classmethod
    def from_unet_config(cls, unet: Mapping, conditioning_channels: int = 3) -> ControlNetSpec:
        """diffusers' UNet/ControlNet encoder: conv_in, then per down block `layers_per_block` resnets and a
        downsampler (all but the last block), then the mid block."""
        boc = list(unet.get("block_out_channels", (320, 640, 1280, 1280)))
        lpb = unet.get("layers_per_block", 2)
        per = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * len(boc)
        out: list[tuple[str, int, int]] = [(down_name(0), boc[0], 1)]
        for i, ch in enumerate(boc):
            for _ in range(per[i]):
                out.append((down_name(len(out)), ch, 2 ** i))
            if i < len(boc) - 1:
                out.append((down_name(len(out)), ch, 2 ** (i + 1)))
        out.append((MID, boc[-1], 2 ** (len(boc) - 1)))
        return cls(tuple(out), conditioning_channels)

    @classmethod
    def from_folder(cls, folder: Path | str) -> ControlNetSpec:
        cfg_path = Path(folder) / "config.json"
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrtkitError(f"cannot read {cfg_path}: {e}") from e
        return cls.from_unet_config(cfg, int(cfg.get("conditioning_channels", 3)))

    def to_json(self) -> str:
        return json.dumps({"residuals": [list(r) for r in self.residuals],
                           "conditioning_channels": self.conditioning_channels})

    @classmethod
    def from_json(cls, text: str) -> ControlNetSpec:
        try:
            d = json.loads(text)
            return cls(tuple((str(n), int(c), int(f)) for n, c, f in d["residuals"]),
                       int(d.get("conditioning_channels", 3)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise TrtkitError(f"metadata {META_CONTROLNET} is unreadable: {e}") from e


def _rng(per) -> ShapeRange:  # type: ignore[no-untyped-def]
    return ShapeRange(*(tuple(per(i)) for i in range(3)))


def residual_shapes(profile: Profile, dims: ModelDims, spec: ControlNetSpec) -> InputShapes:
    """The residuals' min/opt/max shapes (ControlNet outputs = the UNet's extra inputs)."""
    b = profile.batches(doubled=True)
    lat = [(h // dims.vae_scale_factor, w // dims.vae_scale_factor) for h, w in profile._hw()]
    out: InputShapes = {}
    for name, ch, f in spec.residuals:
        out[name] = _rng(lambda i, ch=ch, f=f: (b[i], ch, lat[i][0] // f, lat[i][1] // f))
    return out


def shapes(profile: Profile, component: str, dims: ModelDims, spec: ControlNetSpec) -> InputShapes:
    """`controlnet`: the UNet's inputs (added conditions last, as the UNet's) with the conditioning image and
    scale after encoder_hidden_states; `unet`: the UNet's inputs, then every residual."""
    base = profile.shapes("unet", dims)  # checks the resolution against the model's down-scaling
    if component == "unet":
        return {**base, **residual_shapes(profile, dims, spec)}
    if component != "controlnet":
        raise TrtkitError(f"component {component!r} takes no ControlNet shapes")
    b = profile.batches(doubled=True)
    hw = profile._hw()
    out: InputShapes = {k: base[k] for k in ("sample", "timestep", "encoder_hidden_states")}
    out[COND] = _rng(lambda i: (b[i], spec.conditioning_channels, *hw[i]))
    out[SCALE] = ShapeRange.fixed((1,))  # an input, so the runtime changes it without a rebuild
    out.update({k: v for k, v in base.items() if k in ("text_embeds", "time_ids")})
    return out
