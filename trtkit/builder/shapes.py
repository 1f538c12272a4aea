"""From --profile names and --shapes overrides to checked min/opt/max shapes, one set per
TensorRT optimization profile."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from trtkit.builder.config import BuildConfig
from trtkit.builder.source import OnnxSource
from trtkit.errors import TrtkitError
from trtkit.profiles import (
    InputShapes,
    ModelDims,
    apply_overrides,
    check_against_inputs,
    fmt_dims,
    get_profile,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileShapes:
    name: str  # the preset's name, or "shapes" / "shapes-N" for shapes given directly
    shapes: InputShapes

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "shapes": {k: v.to_json() for k, v in self.shapes.items()}}


def model_dims(config: BuildConfig, source: OnnxSource) -> tuple[ModelDims, str]:
    """ModelDims for the presets, and where they came from (for the metadata)."""
    folder = config.model_dir or source.model_dir
    if folder is not None:
        return ModelDims.from_folder(folder), f"model folder {folder}"
    # No folder: the sizes the presets need are static dims of the exported inputs.
    ins = source.inputs
    kw: dict[str, int | None] = {}

    def static(name: str, axis: int) -> int | None:
        dims = ins.get(name, ())
        return dims[axis] if len(dims) > axis and isinstance(dims[axis], int) else None  # type: ignore[return-value]

    for key, (name, axis) in {"latent_channels": ("sample", 1), "cross_attention_dim": ("encoder_hidden_states", 2),
                              "text_embeds_dim": ("text_embeds", 1), "time_ids_len": ("time_ids", 1)}.items():
        v = static(name, axis)
        if v is not None:
            kw[key] = v
    if "latent" in ins and static("latent", 1) is not None:
        kw["latent_channels"] = static("latent", 1)
    if "text_embeds" not in ins:
        kw["text_embeds_dim"] = None
    return ModelDims(**kw), "static dims of the ONNX inputs"  # type: ignore[arg-type]


def resolve_profiles(config: BuildConfig, source: OnnxSource) -> tuple[list[ProfileShapes], str]:
    """One checked ProfileShapes per TensorRT optimization profile, and the ModelDims origin."""
    overrides = dict(shapes=config.shapes, min_shapes=config.min_shapes, opt_shapes=config.opt_shapes,
                     max_shapes=config.max_shapes)
    presets = [p for p in config.profiles if ":" not in p]
    inline = [p for p in config.profiles if ":" in p]
    out: list[ProfileShapes] = []
    dims_from = ""
    if presets:
        dims, dims_from = model_dims(config, source)
        for name in presets:
            prof = get_profile(name)
            if config.static:
                prof = prof.with_static()
            if "trtkit.dit_dims" in source.metadata:  # a FLUX / SD3 transformer: its sizes from its export
                from trtkit.profiles_dit import DitDims
                from trtkit.profiles_dit import shapes as dit_shapes

                comp = "transformer" if source.component == "transformer" else "text_encoder_3"  # or a T5
                base = dit_shapes(prof, comp, DitDims.from_json(source.metadata["trtkit.dit_dims"]))
            elif "trtkit.controlnet" in source.metadata:  # a ControlNet, or a UNet taking its residuals
                from trtkit.profiles_controlnet import ControlNetSpec
                from trtkit.profiles_controlnet import shapes as cn_shapes

                base = cn_shapes(prof, source.component, dims,
                                 ControlNetSpec.from_json(source.metadata["trtkit.controlnet"]))
            else:
                base = prof.shapes(source.component, dims)
            out.append(ProfileShapes(name, apply_overrides(base, **overrides)))
    elif any(overrides.values()):
        out.append(ProfileShapes("shapes", apply_overrides(None, **overrides)))
    for i, text in enumerate(inline, 1):
        out.append(ProfileShapes("shapes" if len(inline) == 1 and not any(o.name == "shapes" for o in out)
                                 else f"shapes-{i}",
                                 apply_overrides(None, shapes=text)))
    if not out:
        if all(all(isinstance(d, int) and d > 0 for d in dims) for dims in source.inputs.values()):
            return [], "static ONNX inputs"  # a fully static model needs no profile
        raise TrtkitError(f"{source.path.name} has dynamic inputs; name a --profile (see `trtkit profiles`) "
                          "or give --shapes")
    names = [p.name for p in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise TrtkitError(f"profile {sorted(dup)[0]} is given twice")
    for p in out:
        check_against_inputs(p.shapes, source.inputs, where=f"{source.path.name} (profile {p.name})")
        for name, in_dims in source.inputs.items():
            dynamic = any(not (isinstance(d, int) and d > 0) for d in in_dims)
            if dynamic and name not in p.shapes:
                raise TrtkitError(f"profile {p.name} gives no shape for input {name!r}, which is dynamic "
                                  f"({fmt_dims(tuple(d if isinstance(d, int) else -1 for d in in_dims))}); "
                                  "add it with --shapes")
    return out, dims_from
