"""LoRA refit weights for an exported UNet (numpy only): read an adapter file, map its layers to the ONNX
initializers, compute W + scale * alpha/r * B@A for every layer it touches.

Key styles read (safetensors):
  * diffusers / PEFT: `unet.<module>.lora_A.weight`, `unet.<module>.lora_B.weight` (prefix `unet.` or
    `base_model.model.` or none); alpha per module from a `<module>.alpha` tensor, else from the
    `lora_adapter_metadata` diffusers writes (`unet.lora_alpha`, `unet.alpha_pattern`), else alpha = rank
    (what diffusers assumes too).
  * kohya: `lora_unet_<module with _ for .>.lora_down.weight` / `.lora_up.weight` / `.alpha`. Underscores are
    ambiguous (`to_out_0`, `transformer_blocks`), so names are resolved against the modules the ONNX has.
Module names on the ONNX side come from patterns.find (node scopes of the exporter), i.e. diffusers names.
Text-encoder keys (`text_encoder*.`, `lora_te*_`) are not part of a UNet: an error, or skipped (and
counted) with `text_encoder="skip"`. Any other key that maps to no ONNX weight is an error (one line).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from trtkit.errors import TrtkitError
from trtkit.graph.patterns import Matches, WeightedMatch

_TE = re.compile(r"^(text_encoder(_2)?\.|lora_te\d?_|base_model\.model\.text_model)")
_PEFT = re.compile(r"^(?:unet\.|base_model\.model\.)?(?P<m>.+?)\.lora_(?P<p>A|B)(?:\.default)?\.weight$")
_KOHYA = re.compile(r"^lora_unet_(?P<m>.+?)\.(?P<p>lora_down|lora_up)\.weight$")
_ALPHA = re.compile(r"^(?:unet\.|base_model\.model\.|lora_unet_)?(?P<m>.+?)\.alpha$")


@dataclass
class LoraLayer:
    module: str  # the adapter's name for it (diffusers dotted, or kohya underscored)
    down: np.ndarray | None = None  # A: (r, in) or (r, in, kh, kw)
    up: np.ndarray | None = None  # B: (out, r) or (out, r, 1, 1)
    alpha: float | None = None

    @property
    def rank(self) -> int:
        assert self.down is not None
        return int(self.down.shape[0])

    def delta(self) -> np.ndarray:
        """alpha/r * B@A in the module's own weight layout: (out, in) or (out, in, kh, kw); float32."""
        if self.down is None or self.up is None:
            raise TrtkitError(f"LoRA layer {self.module} has only {'lora_up/B' if self.down is None else 'lora_down/A'}")
        a = self.down.astype(np.float32)
        b = self.up.astype(np.float32).reshape(self.up.shape[0], -1)
        if b.shape[1] != a.shape[0]:
            raise TrtkitError(f"LoRA layer {self.module}: up {self.up.shape} and down {self.down.shape} ranks differ")
        d = b @ a.reshape(a.shape[0], -1)
        alpha = float(self.rank if self.alpha is None else self.alpha)
        return (d * (alpha / self.rank)).reshape((b.shape[0], *a.shape[1:]))


@dataclass
class Adapter:
    layers: dict[str, LoraLayer]
    style: str  # "peft" | "kohya"
    skipped: list[str] = field(default_factory=list)  # text-encoder keys left out


def read_adapter(path: Path | str, text_encoder: str = "error") -> Adapter:
    """The UNet layers of a LoRA safetensors file (see the module doc for the key styles)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TrtkitError(f"{path}: no such LoRA file")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:  # bfloat16 files: numpy has no bfloat16
        raise TrtkitError(f"{path}: cannot read as a numpy safetensors file: {str(e).splitlines()[0]}") from None
    layers: dict[str, LoraLayer] = {}
    alphas: dict[str, float] = {}
    skipped, unknown = [], []
    styles = set()
    for k, v in tensors.items():
        if _TE.match(k):
            skipped.append(k)
            continue
        m = _KOHYA.match(k) or _PEFT.match(k)
        if m:
            styles.add("kohya" if k.startswith("lora_unet_") else "peft")
            layer = layers.setdefault(m["m"], LoraLayer(m["m"]))
            if m["p"] in ("A", "lora_down"):
                layer.down = v
            else:
                layer.up = v
            continue
        a = _ALPHA.match(k)
        if a:
            alphas[a["m"]] = float(np.asarray(v, np.float32).reshape(-1)[0])
            continue
        unknown.append(k)
    if unknown:
        raise TrtkitError(f"{path}: {len(unknown)} key(s) of no LoRA style trtkit reads, e.g. {unknown[0]}",
                          hint="diffusers/PEFT (lora_A/lora_B) and kohya (lora_down/lora_up) files are supported")
    if skipped and text_encoder != "skip":
        raise TrtkitError(f"{path}: {len(skipped)} key(s) are for the text encoder (e.g. {skipped[0]}); a UNet refit "
                          "cannot apply them", hint="pass text_encoder='skip' (CLI: --skip-text-encoder) to refit the UNet part only")
    if not layers:
        raise TrtkitError(f"{path}: no UNet LoRA layers in it")
    if len(styles) > 1:
        raise TrtkitError(f"{path}: mixes diffusers/PEFT and kohya keys")
    peft_meta = _peft_metadata(meta)
    for name, layer in layers.items():
        if name in alphas:
            layer.alpha = alphas[name]
        elif peft_meta is not None:
            layer.alpha = _pattern(name, peft_meta.get("alpha_pattern") or {}, peft_meta.get("lora_alpha"))
    return Adapter(layers, styles.pop(), skipped)


def _peft_metadata(meta: dict[str, str]) -> dict | None:
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None
    d = json.loads(raw)
    return {k.split(".", 1)[1]: v for k, v in d.items() if k.startswith("unet.")} or None


def _pattern(name: str, patterns: dict, default: float | None) -> float | None:
    for key, v in patterns.items():  # PEFT's alpha_pattern: a module name suffix (or a regex of one)
        if name == key or name.endswith("." + key) or re.fullmatch(key, name):
            return float(v)
    return None if default is None else float(default)


def onnx_module(m: WeightedMatch) -> str:
    """The diffusers module name of an ONNX weighted op (the exporter's wrapper adds `unet.` to some)."""
    return m.module[5:] if m.module.startswith("unet.") else m.module


def map_layers(adapter: Adapter, matches: Matches) -> dict[str, WeightedMatch]:
    """adapter layer name -> the ONNX op it changes; every layer must map, else one TrtkitError."""
    by_name = {onnx_module(m): m for m in [*matches.linear, *matches.conv]}
    by_kohya = {n.replace(".", "_"): m for n, m in by_name.items()}
    table = by_kohya if adapter.style == "kohya" else by_name
    out, missing = {}, []
    for name in adapter.layers:
        m = table.get(name)
        if m is None:
            missing.append(name)
        else:
            out[name] = m
    if missing:
        raise TrtkitError(f"{len(missing)} LoRA layer(s) match no weight of the ONNX UNet, e.g. {missing[0]}",
                          hint="the adapter is for another model, or the ONNX was exported without node scopes")
    return out


def fused_weights(adapter: Adapter, matches: Matches, base: dict[str, np.ndarray], scale: float = 1.0
                  ) -> dict[str, np.ndarray]:
    """ONNX initializer name -> W + scale * alpha/r * B@A, in the initializer's layout and dtype. `base` holds the
    float weights by initializer name (initializers_of). Two layers on one initializer add up."""
    targets = map_layers(adapter, matches)
    acc: dict[str, np.ndarray] = {}
    for name, m in targets.items():
        if m.weight_type is not None:
            raise TrtkitError(f"{m.module}: the weight is already quantized ({m.weight_type}); give the float ONNX "
                              "as the base (--base) and requantize_weights() the result")
        if m.weight not in base:
            raise TrtkitError(f"{m.module}: initializer {m.weight} not found in the base weights")
        w = base[m.weight]
        d = adapter.layers[name].delta() * np.float32(scale)
        if m.kind == "linear" and m.axis != 0:  # MatMul keeps the weight as (in, out)
            d = d.T
        if d.shape != w.shape:
            raise TrtkitError(f"{m.module}: LoRA delta {d.shape} does not fit the weight {w.shape}")
        acc[m.weight] = acc.get(m.weight, w.astype(np.float32)) + d
    return {k: v.astype(base[k].dtype) for k, v in acc.items()}


def requantized_weights(adapter: Adapter, q_graph: gs.Graph, float_matches: Matches,
                        float_base: dict[str, np.ndarray], scale: float = 1.0) -> dict[str, np.ndarray]:
    """For a Q/DQ ONNX (trtkit quantize): every touched 8-bit weight re-quantized per output channel from the
    float base weight + LoRA delta, with new weight scales; activation scales stay as calibrated. Returns
    initializer name -> new values (the 8-bit weight raw-typed as quantize_weight gives it, its float32 scale).
    Touched layers the quantizer left in float get the float fused weight."""
    from trtkit.graph.patterns import find, producer
    from trtkit.graph.qdq import quantize_weight

    smoothed = [t for t in q_graph.tensors() if "smooth_inv" in t or "gamma_smoothed" in t]
    if smoothed:  # the weights hold W*s and the activations /s: W+delta re-quantized without s would be wrong
        raise TrtkitError("the quantized ONNX was calibrated with SmoothQuant (its smoothing is folded into the "
                          "weights); a LoRA refit cannot recompute those",
                          hint="calibrate without --smoothquant (trtkit's default) for an engine you refit")
    fused = fused_weights(adapter, float_matches, float_base, scale)  # by float initializer name
    q_matches = find(q_graph)
    q_by_module = {onnx_module(m): m for m in [*q_matches.linear, *q_matches.conv]}
    nodes = {n.name: n for n in q_graph.nodes}
    out: dict[str, np.ndarray] = {}
    for fm in map_layers(adapter, float_matches).values():
        module = onnx_module(fm)
        qm = q_by_module.get(module)
        if qm is None:
            raise TrtkitError(f"{module}: not found in the quantized ONNX (was it exported from the same UNet?)")
        w = fused[fm.weight]
        if qm.weight_type is None:
            out[qm.weight] = w.astype(np.float16) if _is_half(q_graph, qm.weight) else w
            continue
        dq = producer(nodes[qm.node].inputs[1])
        if dq is None or dq.op != "DequantizeLinear":
            raise TrtkitError(f"{module}: its 8-bit weight has no DequantizeLinear in front")
        old_scale = np.asarray(dq.inputs[1].values, np.float32)
        fp16 = bool(np.array_equal(old_scale.astype(np.float16).astype(np.float32), old_scale))
        q, s = quantize_weight(w.astype(np.float32), int(dq.attrs.get("axis", qm.axis)), qm.weight_type, fp16)
        out[qm.weight] = q
        out[dq.inputs[1].name] = s.astype(old_scale.dtype).reshape(old_scale.shape)
    return out


def _is_half(graph: gs.Graph, name: str) -> bool:
    t = graph.tensors().get(name)
    return t is not None and getattr(t, "dtype", None) == np.float16


def initializers_of(model: onnx.ModelProto, names: set[str] | None = None,
                    base_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Initializer values by name (external data read from `base_dir`)."""
    out = {}
    for t in model.graph.initializer:
        if names is None or t.name in names:
            out[t.name] = numpy_helper.to_array(t, base_dir=str(base_dir) if base_dir else "")
    return out


def apply_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> None:
    """Replace the named initializers in place (shape and dtype must stay: what a refit may change)."""
    index = {t.name: i for i, t in enumerate(model.graph.initializer)}
    for name, w in weights.items():
        if name not in index:
            raise TrtkitError(f"initializer {name} is not in the model")
        old = model.graph.initializer[index[name]]
        if tuple(old.dims) != w.shape:
            raise TrtkitError(f"{name}: new weight {w.shape} != {tuple(old.dims)}")
        new = numpy_helper.from_array(w, name)
        if new.data_type != old.data_type:  # FP8 weights arrive as their uint8 bytes
            if w.dtype.itemsize != 1:
                raise TrtkitError(f"{name}: new weight is {w.dtype}, the model stores type {old.data_type}")
            new = onnx.helper.make_tensor(name, old.data_type, list(w.shape), vals=w.tobytes(), raw=True)
        model.graph.initializer[index[name]].CopyFrom(new)
