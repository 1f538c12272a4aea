"""diffusers folder -> ONNX, with the profile's input names and dynamic axes, checked against torch.

The TorchScript exporter (`dynamo=False`) is used on purpose: it keeps each node's module scope in
its name (`/unet/down_blocks.1/attentions.0/.../to_q/MatMul`), which the Q/DQ pass and the
calibration use to address diffusers modules, and it decomposes attention into MatMul/Softmax/MatMul
that the attention pattern finder can quantize.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtkit._files import ONNX_PROTO_LIMIT, check_output, check_output_dir, made_dir, staged_onnx
from trtkit._quiet import quiet_loading
from trtkit.errors import TrtkitError

# load_component stays importable from here, where tests and users take it
from trtkit.exporter_load import controlnet_exporter, is_dit, is_local, is_t5, load_component, model_dims
from trtkit.profiles import InputShapes, apply_overrides, get_profile

log = logging.getLogger(__name__)

# ONNX metadata keys that later stages read.
META_COMPONENT = "trtkit.component"
META_SCOPE = "trtkit.scope"  # node-name prefix of the exported module ("/unet/")
META_PROFILE = "trtkit.profile"
META_SOURCE = "trtkit.source"
META_DIT_DIMS = "trtkit.dit_dims"  # DiT sizes (trtkit/profiles_dit.py), so later stages rebuild the shapes

OUTPUT_NAMES = {
    "unet": ["noise_pred"],
    "vae_decoder": ["images"],
    "text_encoder": ["last_hidden_state", "pooled_output", "penultimate_hidden_state"],
    "text_encoder_2": ["last_hidden_state", "pooled_output", "penultimate_hidden_state"],
}


@dataclass(frozen=True)
class ExportConfig:
    model_dir: Path
    component: str = "unet"
    profile: str | None = "sdxl-1024"
    out_dir: Path = Path("onnx")
    opset: int = 19
    shapes: str | None = None  # trtexec-style overrides of the profile's opt shapes
    check: bool = True
    external_data: bool | None = None  # None: only when the model passes 2 GB
    seed: int = 0
    # weights' dtype in the ONNX: "float32" (the default; the Q/DQ pass makes the rest FP16) or "float16" /
    # "bfloat16" for a model too large to hold or write in FP32 (a FLUX-size transformer: 48 GB in FP32)
    dtype: str = "float32"


DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ExportResult:
    path: Path
    component: str
    inputs: InputShapes
    external_data: Path | None
    seconds: float
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    num_params: int = 0
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- export wrappers

def _wrapper(component: str, module: Any, sdxl: bool) -> Any:
    """An nn.Module whose forward takes the profile's inputs positionally. The child attribute name
    becomes the node-name scope (recorded as META_SCOPE)."""
    import torch

    class UNetWrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = module

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
            added = {"text_embeds": text_embeds, "time_ids": time_ids} if sdxl else None
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                             return_dict=False)[0]

    class VaeDecoderWrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = module

        def forward(self, latent):
            return self.vae.decode(latent, return_dict=False)[0]

    class TextWrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text_encoder = module

        def forward(self, input_ids):
            out = self.text_encoder(input_ids.to(torch.int64), output_hidden_states=True)
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
            return out.last_hidden_state, pooled, out.hidden_states[-2]

    if component == "unet":
        return UNetWrap(), "unet"
    if component == "vae_decoder":
        return VaeDecoderWrap(), "vae"
    return TextWrap(), "text_encoder"


def example_inputs(shapes: InputShapes, corner: str = "opt", seed: int = 0,
                   vocab_size: int = 1000, fill: dict[str, Any] | None = None) -> dict[str, Any]:
    """Seeded inputs at one corner of the profile (numpy, so onnxruntime and torch share them).
    `fill`: name -> f(dims, rng) for inputs that are not noise (a DiT's timestep convention, RoPE ids)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for name, r in shapes.items():
        dims = getattr(r, corner)
        if fill and name in fill:
            out[name] = fill[name](dims, rng)
        elif name == "input_ids":
            out[name] = rng.integers(0, vocab_size, size=dims).astype(np.int32)
        elif name == "timestep":
            out[name] = np.full(dims, 999.0 * 0.5, dtype=np.float32)
        elif name == "conditioning_scale":  # a ControlNet's: full strength
            out[name] = np.ones(dims, dtype=np.float32)
        elif name == "controlnet_cond":  # a conditioning image, in [0, 1] as diffusers' ControlNet takes it
            out[name] = rng.uniform(0.0, 1.0, size=dims).astype(np.float32)
        elif name == "time_ids":
            out[name] = np.tile(np.array([1024, 1024, 0, 0, 1024, 1024], np.float32)[: dims[1]], (dims[0], 1))
        else:
            out[name] = rng.standard_normal(dims).astype(np.float32)
    return out


def _dynamic_axes(shapes: InputShapes, outputs: list[str], component: str) -> dict[str, dict[int, str]]:
    """Batch, token and spatial axes stay dynamic in the ONNX so one file serves several profiles."""
    axes: dict[str, dict[int, str]] = {}
    for name, r in shapes.items():
        if name == "timestep":
            continue
        rank = len(r.opt)
        a = {0: "batch"}
        if rank == 4:
            a.update({2: "height", 3: "width"})
        if name in ("encoder_hidden_states", "input_ids"):
            a[1] = "tokens"
        axes[name] = a
    for o in outputs:
        if component in ("unet", "vae_decoder"):
            axes[o] = {0: "batch", 2: "out_height", 3: "out_width"}
        else:
            axes[o] = {0: "batch"} if o == "pooled_output" else {0: "batch", 1: "tokens"}
    return axes


# --------------------------------------------------------------------------- the verb

def resolve_shapes(model_dir: Path | str, component: str, profile: str | None, shapes: str | None = None,
                   min_shapes: str | None = None, opt_shapes: str | None = None,
                   max_shapes: str | None = None) -> InputShapes:
    base: InputShapes | None
    if profile and is_dit(model_dir, component):
        from trtkit.profiles_dit import DitDims
        from trtkit.profiles_dit import shapes as dit_shapes

        dims = DitDims.from_folder(model_dir)
        base = dit_shapes(get_profile(profile), "text_encoder_3" if is_t5(model_dir, component) else component, dims)
    elif profile and (spec := controlnet_exporter().spec_of(model_dir, component)) is not None:
        from trtkit.profiles_controlnet import shapes as cn_shapes

        comp = "unet" if component == "unet" else "controlnet"
        base = cn_shapes(get_profile(profile), comp, model_dims(model_dir), spec)
    else:
        base = get_profile(profile).shapes(component, model_dims(model_dir)) if profile else None
    return apply_overrides(base, shapes=shapes, min_shapes=min_shapes, opt_shapes=opt_shapes,
                           max_shapes=max_shapes)


def _model_files(model_dir: Path | str) -> list[Path]:
    """The files an export reads (a local folder; none for a hub id): the output must not be one."""
    root = Path(model_dir)
    return [f for f in root.rglob("*") if f.is_file()] if root.is_dir() else []


def export(config: ExportConfig, progress: Any = None, module: Any = None) -> ExportResult:
    """Export one component of a diffusers folder to `out_dir/<component>.onnx`.

    `module`: the component already in memory (made by the caller, e.g. with random weights on a GPU),
    used instead of loading it from the folder, which then only needs its config.json; it is traced
    on its own device and dtype."""
    import numpy as np
    import onnx
    import torch

    t0 = time.perf_counter()
    if config.dtype not in DTYPES:
        raise TrtkitError(f"dtype {config.dtype!r} is not one of {', '.join(DTYPES)}")
    if not is_local(config.model_dir) and not str(config.model_dir).count("/") == 1:
        raise TrtkitError(f"model folder {config.model_dir} does not exist")
    shapes = resolve_shapes(config.model_dir, config.component, config.profile, config.shapes)
    # Checked now, created only when there is something to write (a failed export leaves no empty folder).
    out_dir = check_output_dir(Path(config.out_dir))
    dest = check_output(out_dir / f"{config.component}.onnx", what="output ONNX",
                        inputs=_model_files(config.model_dir), sidecars=lambda o: [o.parent / (o.name + ".data")])
    step = progress or (lambda msg: None)

    if module is None:
        step(f"loading {config.component}")
        module = load_component(config.model_dir, config.component, getattr(torch, config.dtype))
    cn = controlnet_exporter()
    cn_spec = cn.spec_of(config.model_dir, config.component)
    sdxl = (config.component == "unet" or cn_spec is not None) and \
        getattr(module.config, "addition_embed_type", None) == "text_time"
    if cn_spec is not None:
        shapes = cn.check_inputs(shapes, config.component, sdxl, cn_spec)
    elif config.component == "unet":
        expected = {"sample", "timestep", "encoder_hidden_states"} | ({"text_embeds", "time_ids"} if sdxl else set())
        extra = set(shapes) - expected
        if extra:
            raise TrtkitError(f"input {sorted(extra)[0]!r} is not an input of this UNet; "
                              f"its inputs are: {', '.join(sorted(expected))}")
        shapes = {k: shapes[k] for k in ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
                  if k in shapes}
    meta: dict[str, str] = {}
    fill = None
    traced: Any = contextlib.nullcontext()
    fold = True
    if is_dit(config.model_dir, config.component):
        from trtkit import exporter_dit
        from trtkit.profiles_dit import DitDims, sample_values

        t5 = is_t5(config.model_dir, config.component)
        outputs = exporter_dit.OUTPUT_NAMES["t5" if t5 else "transformer"]
        wrapper, scope = exporter_dit.wrapper(module, t5, shapes)
        axes = exporter_dit.dynamic_axes(shapes, outputs, t5)
        dims = DitDims.from_folder(config.model_dir)
        meta[META_DIT_DIMS] = dims.to_json()  # the T5's too: its token count for the build's presets
        if not t5:
            fill = sample_values(get_profile(config.profile), dims) if config.profile else None
            traced = contextlib.ExitStack()
            traced.enter_context(exporter_dit.float32_rope(module))
            traced.enter_context(exporter_dit.traceable_rms_norm())
            fold = False  # see exporter_dit.fold_weight_transposes
    elif cn_spec is not None:  # a ControlNet, or a UNet taking its residuals (trtkit/exporter_controlnet.py)
        from trtkit.profiles_controlnet import META_CONTROLNET

        meta[META_CONTROLNET] = cn_spec.to_json()
        if cn.is_controlnet(config.component):
            outputs, scope = cn_spec.names, "controlnet"
            wrapper = cn.controlnet_wrapper(module, sdxl)
        else:
            outputs, scope = OUTPUT_NAMES["unet"], "unet"
            wrapper = cn.unet_wrapper(module, sdxl, cn_spec)
        axes = cn.dynamic_axes(shapes, outputs, config.component)
    else:
        outputs = OUTPUT_NAMES[config.component]
        wrapper, scope = _wrapper(config.component, module, sdxl)
        axes = _dynamic_axes(shapes, outputs, config.component)
    # eval: torch.onnx.export restores the wrapper's own mode afterwards, and a fresh nn.Module is in
    # training mode, which would turn on the dropout of the check's torch reference (T5: 0.1)
    wrapper.eval()
    n_params = sum(p.numel() for p in module.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    use_external = config.external_data if config.external_data is not None else n_bytes > ONNX_PROTO_LIMIT
    vocab = getattr(getattr(module, "config", None), "vocab_size", 1000)
    feeds = example_inputs(shapes, "opt", config.seed, vocab, fill)
    device = next(module.parameters()).device
    args = tuple(torch.from_numpy(v).to(device) for v in feeds.values())

    with made_dir(out_dir), tempfile.TemporaryDirectory(prefix=".export-", dir=out_dir) as tmpd:
        tmp = Path(tmpd) / "raw.onnx"
        step(f"exporting {config.component} ({n_params / 1e6:.1f} M parameters)")
        try:
            with quiet_loading(), torch.no_grad(), traced:
                torch.onnx.export(wrapper, args, str(tmp), dynamo=False, opset_version=config.opset,
                                  input_names=list(shapes), output_names=outputs, dynamic_axes=axes,
                                  do_constant_folding=fold)
        except Exception as e:  # the exporter's own errors are long; keep the first line
            raise TrtkitError(f"ONNX export of {config.component} failed: {str(e).splitlines()[0]}") from e

        step("shape inference")
        # A model with external data stays on disk: its weights are streamed from the exporter's files to the
        # output's data file one at a time (a FLUX-size transformer's would otherwise be held once loaded and
        # once more as its folded transposes).
        stream = use_external and not fold
        model = onnx.load(str(tmp), load_external_data=not stream)
        if stream:
            from trtkit.exporter_dit import inline_attribute_tensors

            inline_attribute_tensors(model, Path(tmpd))
        if not fold:
            from trtkit.exporter_dit import fold_weight_transposes

            fold_weight_transposes(model, Path(tmpd) if stream else None)
        component = "controlnet" if cn.is_controlnet(config.component) else config.component  # shapes by kind
        _set_meta(model, {META_COMPONENT: component, META_SCOPE: f"/{scope}/",
                          META_PROFILE: config.profile or "", META_SOURCE: str(config.model_dir), **meta})
        result = ExportResult(path=dest, component=config.component, inputs=shapes,
                              external_data=(dest.parent / f"{dest.name}.data") if use_external else None,
                              seconds=0.0, num_params=n_params)
        if config.component == "controlnet" and len(more := cn.controlnet_folders(config.model_dir)) > 1:
            result.notes.append(f"this folder has {len(more)} ControlNets; export the others too "
                                f"({', '.join('-c ' + m for m in more[1:])}): one engine each, the runtime adds "
                                "their residuals")
        if stream:
            from trtkit.graph.external import Streamer

            Streamer(Path(tmpd)).write(model, dest, strict=False, check=False)
            del model
        with contextlib.nullcontext(dest) if stream else staged_onnx(model, dest, external=use_external) as staged:
            if not stream:
                del model
            if config.check:
                step("checking against torch (onnxruntime)")
                with torch.no_grad():
                    ref = wrapper(*args)
                ref = [r.float().cpu().numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
                got = run_onnxruntime(staged, feeds)
                abs_err = max(float(np.max(np.abs(g - r))) for g, r in zip(got, ref, strict=True))
                scale = max(float(np.max(np.abs(r))) for r in ref) or 1.0
                result.max_abs_err, result.max_rel_err = abs_err, abs_err / scale
    result.seconds = time.perf_counter() - t0
    return result


def _set_meta(model: Any, props: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for k, v in props.items():
        if k in existing:
            existing[k].value = v
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v


def read_meta(model: Any) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def run_onnxruntime(path: Path | str, feeds: dict[str, Any]) -> list[Any]:
    """Run an ONNX file on onnxruntime's CPU provider (the numerical reference of the tests)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise TrtkitError("onnxruntime is not installed; pip install 'trtkit[dev]' or pass --no-check") from e
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def copy_onnx(src: Path, dest: Path) -> None:
    """Copy an ONNX file and its external data file(s) (same relative locations)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    shutil.copy2(src, dest)
    model = onnx.load(str(src), load_external_data=False)
    for t in _get_all_tensors(model):
        for e in t.external_data:
            if e.key == "location" and (src.parent / e.value).exists():
                target = dest.parent / e.value
                if not target.exists():
                    shutil.copy2(src.parent / e.value, target)
