"""NVIDIA ModelOpt's diffusers recipe on a UNet, as the reference trtkit is cross-checked against.

What ModelOpt's `examples/diffusers/quantization` flow does, in ModelOpt's own API (written from its
documented behaviour, not copied): `mtq.quantize` with the diffusers INT8/FP8 preset (per-tensor
activations; INT8 weights per output channel, FP8 weights per tensor) and plain max calibration over
a forward loop; then the quantization level switches Linear quantizers on or off by name; then the
example's `filter_func` disables its list of modules; FP8 attention (q/k/v BMM and softmax
quantizers) only at level 4 and only where the head size is a multiple of 16.

`export_onnx` writes the quantized UNet through trtkit's exporter wrapper (TorchScript, module
scopes kept) so ModelOpt's quantizers emit their own Q/DQ form; FP8 graphs then go through ModelOpt's
`FP8QuantExporter` (weights stored in FP8, `trt::TRT_FP8*` custom ops made native QuantizeLinear).

Needs `pip install 'trtkit[modelopt]'`; nothing in trtkit imports this module except the
cross-check benchmark and the tests marked `modelopt`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The example's default `filter_func` (ModelOpt 0.47): note it has no `proj_out`, which
# demoDiffusion's list (trtkit.calibration.levels.EXCLUDED) has.
MODELOPT_EXCLUDED = ("time_emb_proj", "time_embedding", "conv_in", "conv_out", "conv_shortcut", "add_embedding",
                     "pos_embed", "time_text_embed", "context_embedder", "norm_out", "x_embedder")
_FILTER = re.compile(".*(" + "|".join(MODELOPT_EXCLUDED) + ").*")
BMM_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer")


def modelopt_filter(name: str) -> bool:
    """True where ModelOpt's diffusers example keeps the module unquantized."""
    return _FILTER.match(name) is not None


def preset(precision: str, level: float) -> dict[str, Any]:
    """The diffusers preset config (from modelopt_recipes), with the MHA quantizers for FP8 level 4."""
    import copy

    from modelopt.torch.opt.config_loader import load_config
    from modelopt.torch.quantization.config import QuantizeConfig

    name = {"int8": "int8", "fp8": "fp8"}[precision]
    cfg = load_config(f"configs/ptq/presets/diffusers/{name}", schema_type=QuantizeConfig)
    out: dict[str, Any] = copy.deepcopy(cfg.model_dump(exclude_unset=True))
    if precision == "fp8" and level >= 4:
        fp8 = {"num_bits": (4, 3), "axis": None}
        out["quant_cfg"] += [{"quantizer_name": f"*{q}", "cfg": dict(fp8)} for q in BMM_QUANTIZERS[:3]]
    # TensorRT's strongly typed Q/DQ want the scale in the activation's type (FP16 for the FP8 MHA).
    for entry in out["quant_cfg"]:
        c = entry.get("cfg")
        if isinstance(c, dict) and "num_bits" in c:
            c.setdefault("trt_high_precision_dtype", "Half" if precision == "fp8" else "Float")
    return out


def _linear_on(name: str, level: float) -> bool:
    if level >= 3:
        return True
    if level >= 2.5 and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"):
        return True
    return level >= 2 and "ff.net" in name


def quantize_unet(unet: Any, precision: str, level: float, forward_loop: Callable[[Any], None]) -> Any:
    """mtq.quantize the UNet in place (max calibration over `forward_loop`) and apply level and filter."""
    import modelopt.torch.quantization as mtq
    import torch
    from diffusers.models.attention_processor import Attention

    mtq.quantize(unet, preset(precision, level), forward_loop)
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and hasattr(m, "input_quantizer"):
            on = _linear_on(name, level)
            for q in (m.input_quantizer, m.weight_quantizer):
                q.enable() if on else q.disable()
        elif isinstance(m, Attention) and hasattr(m, "q_bmm_quantizer"):
            head = m.inner_dim // m.heads
            if not (precision == "fp8" and level >= 4 and head % 16 == 0):
                for q in BMM_QUANTIZERS:
                    getattr(m, q).disable()
    mtq.disable_quantizer(unet, modelopt_filter)
    return unet


def export_onnx(unet: Any, shapes: dict[str, tuple[int, ...]], out: Path | str, precision: str,
                opset: int = 19, half: bool = False) -> Path:
    """Export a quantized UNet with ModelOpt's quantizer symbolics (its own Q/DQ form)."""
    import numpy as np
    import onnx
    import torch

    from trtkit._files import staged_onnx
    from trtkit.exporter import _wrapper

    sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
    wrapper, _scope = _wrapper("unet", unet, sdxl)
    dtype = torch.float16 if half else torch.float32
    rng = np.random.default_rng(0)
    args = tuple(torch.from_numpy(rng.standard_normal(s).astype(np.float32)).to(dtype) for s in shapes.values())
    if half:
        wrapper = wrapper.half()
    out = Path(out)
    tmp = out.with_name(out.name + ".raw")
    with torch.no_grad():
        torch.onnx.export(wrapper, args, str(tmp), dynamo=False, opset_version=opset, input_names=list(shapes),
                          output_names=["latent"], do_constant_folding=True)
    model = onnx.load(str(tmp))
    tmp.unlink()
    if precision == "fp8":
        from modelopt.onnx.export import FP8QuantExporter

        model = FP8QuantExporter.process_model(model)
    meta = model.metadata_props.add()
    meta.key, meta.value = "trtkit.scope", "/unet/"
    with staged_onnx(model, out):
        pass
    return out
