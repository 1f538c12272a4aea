"""Named shape profiles (one table of data) and the trtexec-style `--shapes` syntax.

A profile names only what a user chooses: image resolution (fixed or a range), images per prompt,
prompt token length and whether classifier-free guidance doubles the batch. Channel and embedding
sizes come from the model's own config (`ModelDims`), so one profile serves a tiny test model and
the real SDXL alike.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from trtkit.errors import TrtkitError

Dims = tuple[int, ...]
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae_decoder")
DIT_COMPONENTS = ("transformer", "text_encoder_3")  # shapes in trtkit/profiles_dit.py


@dataclass(frozen=True)
class ShapeRange:
    """min/opt/max dimensions of one input, as a TensorRT optimization profile wants them."""

    min: Dims
    opt: Dims
    max: Dims

    def __post_init__(self) -> None:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise TrtkitError(f"min/opt/max shapes differ in rank: {self.min}, {self.opt}, {self.max}")
        for lo, mid, hi in zip(self.min, self.opt, self.max, strict=True):
            if not (0 < lo <= mid <= hi) and not (lo == mid == hi == 0):
                raise TrtkitError(f"shapes must satisfy 0 < min <= opt <= max in every dimension: "
                                  f"min {fmt_dims(self.min)}, opt {fmt_dims(self.opt)}, max {fmt_dims(self.max)}")

    @classmethod
    def fixed(cls, dims: Dims) -> ShapeRange:
        return cls(tuple(dims), tuple(dims), tuple(dims))

    @property
    def is_static(self) -> bool:
        return self.min == self.max

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


InputShapes = dict[str, ShapeRange]


# The profile table. Resolutions are (height, width) in pixels; `resolution_range` is
# ((min_h, min_w), (max_h, max_w)) or None for a fixed resolution.
_TABLE: tuple[dict, ...] = (
    dict(name="sd15-512", resolution=(512, 512), description="SD 1.x, 512x512"),
    dict(name="sd15-dyn", resolution=(512, 512), resolution_range=((256, 256), (768, 768)),
         description="SD 1.x, 256 to 768 px, opt 512"),
    dict(name="sd21-768", resolution=(768, 768), description="SD 2.x, 768x768"),
    dict(name="sdxl-1024", resolution=(1024, 1024), description="SDXL base, 1024x1024"),
    dict(name="sdxl-768", resolution=(768, 768), description="SDXL base, 768x768"),
    dict(name="sdxl-dyn", resolution=(1024, 1024), resolution_range=((512, 512), (1536, 1536)),
         description="SDXL base, 512 to 1536 px, opt 1024"),
    dict(name="sdxl-turbo-512", resolution=(512, 512), guidance=False,
         description="SDXL-Turbo, 512x512, no guidance (1 to 4 steps)"),
    dict(name="tiny-256", resolution=(256, 256), description="256x256, for test-size models and smoke runs"),
    # DiT profiles: the family checks the transformer; T5 tokens and guidance inputs come from its config.
    dict(name="flux-1024", resolution=(1024, 1024), guidance=False, family="flux",
         description="FLUX.1, 1024x1024, no CFG (dev: guidance embedding; 512 T5 tokens, schnell 256)"),
    dict(name="flux-dyn", resolution=(1024, 1024), resolution_range=((512, 512), (1536, 1536)), guidance=False,
         family="flux", description="FLUX.1, 512 to 1536 px, opt 1024, no CFG"),
    dict(name="sd3-1024", resolution=(1024, 1024), family="sd3",
         description="SD3/SD3.5, 1024x1024, CFG (batch 2), 77 CLIP + 256 T5 tokens"),
)


@dataclass(frozen=True)
class Profile:
    name: str
    resolution: tuple[int, int]
    description: str = ""
    resolution_range: tuple[tuple[int, int], tuple[int, int]] | None = None
    batch: tuple[int, int, int] = (1, 1, 4)  # images per prompt: min, opt, max
    tokens: int = 77
    guidance: bool = True  # classifier-free guidance: uncond + cond in one UNet batch
    family: str | None = None  # "flux" | "sd3": a DiT profile, checked against the transformer's class
    t5_tokens: int | None = None  # None: from the model's config (trtkit/profiles_dit.py)

    @property
    def static(self) -> bool:
        return self.resolution_range is None and self.batch[0] == self.batch[2]

    def with_static(self) -> Profile:
        """Fixed resolution (the opt one) and fixed batch (the opt one)."""
        b = self.batch[1]
        return replace(self, resolution_range=None, batch=(b, b, b), name=self.name)

    def with_batch(self, opt: int) -> Profile:
        lo, _, hi = self.batch
        if not lo <= opt <= hi:
            raise TrtkitError(f"batch {opt} is outside profile {self.name}'s range {lo}..{hi}")
        return replace(self, batch=(lo, opt, hi))

    def _hw(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        if self.resolution_range is None:
            return self.resolution, self.resolution, self.resolution
        lo, hi = self.resolution_range
        return lo, self.resolution, hi

    def batches(self, doubled: bool) -> tuple[int, int, int]:
        mult = 2 if (doubled and self.guidance) else 1
        return tuple(b * mult for b in self.batch)  # type: ignore[return-value]

    def shapes(self, component: str, dims: ModelDims) -> InputShapes:
        """min/opt/max shapes for every input of `component` of a model with `dims`."""
        if component in DIT_COMPONENTS:
            raise TrtkitError(f"component {component!r} takes its shapes from trtkit.profiles_dit.shapes")
        if component not in COMPONENTS:
            raise TrtkitError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
        hw = self._hw()
        for h, w in hw:
            if h % dims.latent_multiple or w % dims.latent_multiple:
                raise TrtkitError(f"profile {self.name}: resolution {h}x{w} is not a multiple of "
                                  f"{dims.latent_multiple} px, which this model needs")
        lat = [(h // dims.vae_scale_factor, w // dims.vae_scale_factor) for h, w in hw]

        def rng(per: callable) -> ShapeRange:  # type: ignore[valid-type]
            return ShapeRange(*(tuple(per(i)) for i in range(3)))

        if component == "unet":
            b = self.batches(doubled=True)
            out: InputShapes = {
                "sample": rng(lambda i: (b[i], dims.latent_channels, *lat[i])),
                "timestep": ShapeRange.fixed((1,)),
                "encoder_hidden_states": rng(lambda i: (b[i], self.tokens, dims.cross_attention_dim)),
            }
            if dims.text_embeds_dim is not None:
                out["text_embeds"] = rng(lambda i: (b[i], dims.text_embeds_dim))
                out["time_ids"] = rng(lambda i: (b[i], dims.time_ids_len))
            return out
        if component in ("text_encoder", "text_encoder_2"):
            # One call per prompt: [negative; prompt] (doubled) with guidance, the prompt alone without it
            # (guidance <= 1, or SDXL's zero negative), so the range starts at one image, undoubled.
            b = (self.batch[0], *self.batches(doubled=True)[1:])
            return {"input_ids": rng(lambda i: (b[i], self.tokens))}
        b = self.batches(doubled=False)
        return {"latent": rng(lambda i: (b[i], dims.latent_channels, *lat[i]))}

    def summary(self) -> str:
        (h0, w0), (h1, w1), (h2, w2) = self._hw()
        res = f"{h1}x{w1}" if self.resolution_range is None else f"{h0}x{w0}..{h2}x{w2} (opt {h1}x{w1})"
        lo, opt, hi = self.batch
        tokens = f"{self.tokens} tokens" if self.family is None else "tokens from the model"
        return f"{res}, images {lo}..{hi} (opt {opt}), {tokens}, guidance {'on' if self.guidance else 'off'}"


PROFILES: dict[str, Profile] = {row["name"]: Profile(**row) for row in _TABLE}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise TrtkitError(f"unknown profile {name!r}; known profiles: {', '.join(PROFILES)}") from None


@dataclass(frozen=True)
class ModelDims:
    """The sizes a profile needs from a model's config."""

    latent_channels: int = 4
    vae_scale_factor: int = 8
    cross_attention_dim: int = 768
    text_embeds_dim: int | None = None  # SDXL's pooled text embedding; None for SD 1.x/2.x
    time_ids_len: int = 6
    down_levels: int = 4  # number of UNet down blocks; the latent must halve (levels - 1) times

    @property
    def latent_multiple(self) -> int:
        return self.vae_scale_factor * 2 ** (self.down_levels - 1)

    @classmethod
    def from_configs(cls, unet: Mapping | None, vae: Mapping | None = None,
                     text_encoder_2: Mapping | None = None) -> ModelDims:
        kw: dict = {}
        if vae:
            kw["vae_scale_factor"] = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
            kw["latent_channels"] = vae.get("latent_channels", 4)
        if unet:
            kw["latent_channels"] = unet.get("in_channels", 4)
            cad = unet.get("cross_attention_dim", 768)
            kw["cross_attention_dim"] = cad[0] if isinstance(cad, list) else cad
            kw["down_levels"] = len(unet.get("down_block_types", [None] * 4))
            if unet.get("addition_embed_type") == "text_time":
                total = unet["projection_class_embeddings_input_dim"]
                step = unet["addition_time_embed_dim"]
                if text_encoder_2 and "projection_dim" in text_encoder_2:
                    text = text_encoder_2["projection_dim"]
                else:  # SDXL base layout: 6 time ids
                    text = total - 6 * step
                kw["text_embeds_dim"] = text
                kw["time_ids_len"] = (total - text) // step
        return cls(**kw)

    @classmethod
    def from_folder(cls, model_dir: Path | str) -> ModelDims:
        """Read the component configs of a diffusers folder (a pipeline, or a lone UNet folder)."""
        root = Path(model_dir)

        def cfg(sub: str) -> dict | None:
            for p in (root / sub / "config.json", root / "config.json" if sub == "unet" else None):
                if p is not None and p.is_file():
                    try:
                        return json.loads(p.read_text())
                    except json.JSONDecodeError as e:
                        raise TrtkitError(f"{p} is not valid JSON: {e}") from e
            return None

        unet = cfg("unet")
        if unet is None and not (root / "vae").is_dir():
            raise TrtkitError(f"{root} is not a diffusers model folder (no unet/config.json or config.json)")
        return cls.from_configs(unet, cfg("vae"), cfg("text_encoder_2"))


# --------------------------------------------------------------------------- trtexec-style shapes

_ITEM = re.compile(r"^\s*(?P<name>[^\s,]+?)\s*:\s*(?P<dims>\d+(?:\s*x\s*\d+)*)?\s*$")


def parse_shapes(text: str, option: str = "--shapes") -> dict[str, Dims]:
    """Parse `sample:2x4x128x128,timestep:1` (trtexec's syntax) into {name: dims}.

    `name:` with no dimensions is a scalar. A name may itself contain ':' (the last one separates).
    """
    out: dict[str, Dims] = {}
    if not text or not text.strip():
        raise TrtkitError(f"{option} is empty; expected name:AxBxC[,name:...]")
    for item in text.split(","):
        if ":" not in item:
            raise TrtkitError(f"{option}: {item.strip()!r} has no ':'; expected name:AxBxC (e.g. sample:2x4x128x128)")
        name, _, dims = item.strip().rpartition(":")
        name = name.strip()
        m = _ITEM.match(f"{name}:{dims}")
        if not name or m is None:
            raise TrtkitError(f"{option}: cannot read {item.strip()!r}; expected name:AxBxC with positive integers")
        if name in out:
            raise TrtkitError(f"{option}: input {name!r} is given twice")
        parsed = tuple(int(d) for d in re.split(r"\s*x\s*", dims.strip())) if dims.strip() else ()
        if any(d <= 0 for d in parsed):
            raise TrtkitError(f"{option}: {item.strip()!r} has a zero dimension")
        out[name] = parsed
    return out


def fmt_dims(dims: Dims) -> str:
    return "x".join(str(d) for d in dims)


def format_shapes(shapes: Mapping[str, Dims]) -> str:
    return ",".join(f"{k}:{fmt_dims(v)}" for k, v in shapes.items())


def apply_overrides(base: InputShapes | None, *, shapes: str | None = None, min_shapes: str | None = None,
                    opt_shapes: str | None = None, max_shapes: str | None = None) -> InputShapes:
    """Merge trtexec-style overrides over a profile's shapes (or build shapes from them alone).

    `--shapes` fixes min = opt = max for the inputs it names; `--min/opt/max-shapes` replace one
    corner each. Without a base, every input must end up with all three.
    """
    out: dict[str, list[Dims | None]] = {k: [v.min, v.opt, v.max] for k, v in (base or {}).items()}
    if shapes:
        for name, d in parse_shapes(shapes, "--shapes").items():
            out[name] = [d, d, d]
    for i, (text, opt) in enumerate(((min_shapes, "--min-shapes"), (opt_shapes, "--opt-shapes"),
                                     (max_shapes, "--max-shapes"))):
        if text:
            for name, d in parse_shapes(text, opt).items():
                out.setdefault(name, [None, None, None])[i] = d
    result: InputShapes = {}
    for name, (lo, mid, hi) in out.items():
        missing = [n for n, v in zip(("min", "opt", "max"), (lo, mid, hi), strict=True) if v is None]
        if missing:
            raise TrtkitError(f"input {name!r} has no {'/'.join(missing)} shape; give --shapes or all of "
                              "--min-shapes/--opt-shapes/--max-shapes for it")
        result[name] = ShapeRange(lo, mid, hi)  # type: ignore[arg-type]
    if not result:
        raise TrtkitError("no shapes: name a --profile or give --shapes")
    return result


def check_against_inputs(shapes: InputShapes, inputs: Mapping[str, tuple[int | str | None, ...]],
                         where: str = "the model") -> None:
    """Each profile input must exist in the model with the same rank and agree on static dims."""
    for name, rng in shapes.items():
        if name not in inputs:
            raise TrtkitError(f"input {name!r} is not an input of {where}; its inputs are: {', '.join(inputs)}")
        model_dims = inputs[name]
        if len(model_dims) != len(rng.opt):
            raise TrtkitError(f"input {name!r}: shape {fmt_dims(rng.opt)} has rank {len(rng.opt)} but {where} "
                              f"expects rank {len(model_dims)}")
        for axis, d in enumerate(model_dims):
            if isinstance(d, int) and d > 0 and not (rng.min[axis] == rng.max[axis] == d):
                raise TrtkitError(f"input {name!r}: dimension {axis} is fixed to {d} in {where}, but the "
                                  f"profile gives {rng.min[axis]}..{rng.max[axis]}")
