"""Shapes of the DiT components (FLUX.1 and SD3.x transformers, the T5 encoder) for a profile.

The profile (trtkit/profiles.py) names what a user chooses: resolution, images per prompt, whether CFG
doubles the batch. Everything else comes from the model's configs (`DitDims`):
* FLUX: latents packed 2x2 into tokens, hidden_states [B, (H/16)(W/16), 4*latent channels]; RoPE position
  ids img_ids [(H/16)(W/16), 3] and txt_ids [T, 3] (no batch axis, as diffusers passes them); the timestep is
  the sigma in [0, 1] (the model multiplies by 1000); guidance-distilled models (FLUX.1-dev,
  `guidance_embeds`) take the guidance scale as an input and run without CFG; T5 tokens: 512 for those,
  256 otherwise (FLUX.1-schnell), as the diffusers pipelines use them.
* SD3.x: hidden_states [B, C, H/8, W/8] (patchified inside), the prompt 77 CLIP tokens + 256 T5 tokens,
  pooled CLIP-L + CLIP-G embeddings, timestep in [0, 1000], CFG doubles the batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trtkit.errors import TrtkitError
from trtkit.profiles import DIT_COMPONENTS, InputShapes, Profile, ShapeRange

__all__ = ["DIT_COMPONENTS", "DitDims", "is_t5", "sample_values", "shapes"]

DIT_FAMILIES = ("flux", "sd3")
TRANSFORMER_CLASSES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}
CLIP_TOKENS = 77


@dataclass(frozen=True)
class DitDims:
    """The sizes a profile needs from a DiT model's configs."""

    family: str  # flux | sd3
    in_channels: int  # FLUX: packed (4 x latent channels); SD3: latent channels
    joint_attention_dim: int  # T5 width
    pooled_projection_dim: int
    guidance_embeds: bool = False  # FLUX.1-dev: the guidance scale is an input
    patch_size: int = 2  # SD3 patchify (FLUX packs 2x2 outside the model)
    vae_scale_factor: int = 8
    t5_tokens: int = 256
    head_dim: int | None = None  # attention head size (the Q/DQ pass's FP8-attention rule reads it)

    @property
    def latent_multiple(self) -> int:
        """Pixels per token side: the VAE's factor times the 2x2 packing (FLUX) or the patch (SD3)."""
        return self.vae_scale_factor * (2 if self.family == "flux" else self.patch_size)

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance doubles the batch: SD3 yes, FLUX (distilled or schnell) no."""
        return self.family == "sd3"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DitDims:
        return cls(**json.loads(text))

    @classmethod
    def from_configs(cls, transformer: dict[str, Any], vae: dict[str, Any] | None = None) -> DitDims:
        name = transformer.get("_class_name", "")
        if name not in TRANSFORMER_CLASSES:
            raise TrtkitError(f"transformer class {name or '(none)'} is not a supported DiT; "
                              f"expected one of {', '.join(TRANSFORMER_CLASSES)}")
        family = TRANSFORMER_CLASSES[name]
        vae_sf = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1) if vae else 8
        if family == "flux":
            guid = bool(transformer.get("guidance_embeds", False))
            return cls(family, int(transformer.get("in_channels", 64)), int(transformer.get("joint_attention_dim", 4096)),
                       int(transformer.get("pooled_projection_dim", 768)), guid, 1, vae_sf, 512 if guid else 256,
                       int(transformer.get("attention_head_dim", 128)))
        return cls(family, int(transformer.get("in_channels", 16)), int(transformer.get("joint_attention_dim", 4096)),
                   int(transformer.get("pooled_projection_dim", 2048)), False, int(transformer.get("patch_size", 2)),
                   vae_sf, 256, int(transformer.get("attention_head_dim", 64)))

    @classmethod
    def from_folder(cls, model_dir: Path | str) -> DitDims:
        root = Path(model_dir)

        def cfg(sub: str) -> dict[str, Any] | None:
            p = root / sub / "config.json"
            if not p.is_file():
                return None
            try:
                return dict(json.loads(p.read_text()))
            except json.JSONDecodeError as e:
                raise TrtkitError(f"{p} is not valid JSON: {e}") from e

        tr = cfg("transformer")
        if tr is None and (root / "config.json").is_file():
            tr = cfg(".")  # a lone transformer folder
        if tr is None:
            raise TrtkitError(f"{root} has no transformer/config.json: is it a FLUX or SD3 pipeline folder?")
        return cls.from_configs(tr, cfg("vae"))


def is_t5(model_dir: Path | str, component: str) -> bool:
    """A text encoder folder holding a T5 encoder (FLUX's text_encoder_2, SD3's text_encoder_3)."""
    p = Path(model_dir) / component / "config.json"
    try:
        return p.is_file() and json.loads(p.read_text()).get("model_type") == "t5"
    except json.JSONDecodeError:
        return False


def _check_family(profile: Profile, dims: DitDims) -> None:
    if profile.family is not None and profile.family != dims.family:
        raise TrtkitError(f"profile {profile.name} is for {profile.family.upper()} models, but this is a "
                          f"{dims.family.upper()} transformer; see `trtkit profiles`")


def shapes(profile: Profile, component: str, dims: DitDims) -> InputShapes:
    """min/opt/max shapes of every input of a DiT `component` ("transformer", or "text_encoder_3" for any T5)."""
    if component not in DIT_COMPONENTS:
        raise TrtkitError(f"unknown DiT component {component!r}; expected one of {', '.join(DIT_COMPONENTS)}")
    _check_family(profile, dims)
    b = profile.batches(doubled=dims.cfg)
    t5 = profile.t5_tokens or dims.t5_tokens

    def rng(per: Callable[[int], tuple[int, ...]]) -> ShapeRange:
        return ShapeRange(*(per(i) for i in range(3)))

    if component == "text_encoder_3":
        return {"input_ids": rng(lambda i: (b[i], t5))}
    hw = profile._hw()
    for h, w in hw:
        if h % dims.latent_multiple or w % dims.latent_multiple:
            raise TrtkitError(f"profile {profile.name}: resolution {h}x{w} is not a multiple of "
                              f"{dims.latent_multiple} px, which this {dims.family.upper()} model needs")
    if dims.family == "flux":
        tok = [(h // dims.latent_multiple) * (w // dims.latent_multiple) for h, w in hw]
        out: InputShapes = {
            "hidden_states": rng(lambda i: (b[i], tok[i], dims.in_channels)),
            "encoder_hidden_states": rng(lambda i: (b[i], t5, dims.joint_attention_dim)),
            "pooled_projections": rng(lambda i: (b[i], dims.pooled_projection_dim)),
            "timestep": rng(lambda i: (b[i],)),
            "img_ids": rng(lambda i: (tok[i], 3)),
            "txt_ids": ShapeRange.fixed((t5, 3)),
        }
        if dims.guidance_embeds:
            out["guidance"] = rng(lambda i: (b[i],))
        return out
    lat = [(h // dims.vae_scale_factor, w // dims.vae_scale_factor) for h, w in hw]
    return {
        "hidden_states": rng(lambda i: (b[i], dims.in_channels, *lat[i])),
        "encoder_hidden_states": rng(lambda i: (b[i], CLIP_TOKENS + t5, dims.joint_attention_dim)),
        "pooled_projections": rng(lambda i: (b[i], dims.pooled_projection_dim)),
        "timestep": rng(lambda i: (b[i],)),
    }


def sample_values(profile: Profile, dims: DitDims, corner: str = "opt") -> dict[str, Callable[[tuple[int, ...], Any], Any]]:
    """Fillers for the inputs that are not noise: the timestep in the family's convention, the guidance
    scale, and FLUX's RoPE ids (text ids 0; image ids (0, row, column) of the packed grid)."""
    import numpy as np

    idx = ("min", "opt", "max").index(corner)
    h, w = profile._hw()[idx]
    rows, cols = h // dims.latent_multiple, w // dims.latent_multiple

    def img_ids(d: tuple[int, ...], rng: Any) -> Any:
        r, c = np.divmod(np.arange(d[0]), cols if d[0] == rows * cols else max(1, int(round(d[0] ** 0.5))))
        return np.stack([np.zeros_like(r), r, c], axis=1).astype(np.float32)

    t = 0.5 if dims.family == "flux" else 500.0
    return {"timestep": lambda d, rng: np.full(d, t, np.float32),
            "guidance": lambda d, rng: np.full(d, 3.5, np.float32),
            "img_ids": img_ids,
            "txt_ids": lambda d, rng: np.zeros(d, np.float32)}
