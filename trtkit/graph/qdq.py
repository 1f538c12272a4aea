"""Q/DQ insertion: explicit INT8 / FP8 quantization of linear, conv and attention in an exported
diffusers ONNX, at the quantization levels of NVIDIA's diffusion demo.

What comes out, per quantized op:
  activation -> QuantizeLinear -> DequantizeLinear -> op <- DequantizeLinear <- 8-bit weight initializer
* weights: per output channel (Conv axis 0, MatMul [in, out] axis 1, Gemm transB axis 0), stored already
  quantized, so the 8-bit file is about 4x smaller than the FP32 one;
* activations: per tensor, from the calibration file (trtkit/calibfile.py) or, without one, the max
  over one onnxruntime run on the profile's sample inputs; one Q/DQ per tensor, shared by all the
  quantized ops that read it (q/k/v projections of one normalized input);
* attention (FP8 at level 4, or when asked): Q/DQ on the inputs of both batched matmuls (Q, K, V and
  the softmax output, the latter with the fixed amax 1), the pattern TensorRT fuses into FP8 MHA;
* SmoothQuant vectors from the calibration: a per-channel 1/s folded into the preceding LayerNorm (or
  a Mul when there is none) and s multiplied into the weight's input channels;
* then (fp16=True) everything else strongly typed FP16 (trtkit/graph/fp16.py), with FP32 islands and
  casts where TensorRT needs them.

Numbers follow the TensorRT conventions: INT8 symmetric, scale amax/127, zero point 0; FP8 E4M3,
scale amax/448, FLOAT8E4M3FN zero points (opset 19).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from trtkit._files import check_output, load_onnx, staged_onnx
from trtkit.errors import TrtkitError
from trtkit.graph import patterns
from trtkit.graph.patterns import AttentionMatch, Matches, WeightedMatch

log = logging.getLogger(__name__)

PRECISIONS = ("int8", "fp8")
LEVELS = (1.0, 2.0, 2.5, 3.0, 4.0)
QMAX = {"int8": 127.0, "fp8": 448.0}
ONNX_QTYPE = {"int8": onnx.TensorProto.INT8, "fp8": onnx.TensorProto.FLOAT8E4M3FN}
# The demo's filter_func: embeddings, the first and last conv, shortcut convs, the transformer
# output projections and the output norm stay in high precision.
DEFAULT_EXCLUDE = ("time_emb_proj", "time_embedding", "conv_in", "conv_out", "conv_shortcut", "add_embedding",
                   "pos_embed", "time_text_embed", "context_embedder", "norm_out", "proj_out")
QKV_LEAVES = ("to_q", "to_k", "to_v", "to_qkv", "to_kv")  # separate and fused projections
META_KEY = "trtkit.qdq"  # JSON: precision, level, decisions (coverage reads it)
FP16_MIN_NORMAL = 2.0**-14  # scales stored in FP16 must stay normal


@dataclass(frozen=True)
class QuantizeConfig:
    onnx_path: Path
    output: Path
    precision: str = "int8"  # "int8" | "fp8"
    level: float | None = None  # None: 3 for int8, 4 for fp8
    calib: Path | None = None  # trtkit calibration file; None: max over a sample run
    include: tuple[str, ...] = ()  # module-name patterns quantized whatever the level or exclusions
    exclude: tuple[str, ...] = ()  # module-name patterns never quantized (added to the defaults)
    profile: str = "tiny-256"  # sample-input shapes for max calibration
    fp16: bool = True  # convert everything else to strongly typed FP16
    quantize_attention: bool | None = None  # None: FP8 at level >= 4 only
    default_exclusions: bool = True
    io_dtype: str = "float32"  # graph input/output type after the FP16 conversion
    seed: int = 0


@dataclass(frozen=True)
class Decision:
    module: str
    kind: str  # linear | conv | attention
    quantized: bool
    reason: str
    type: str | None = None  # int8 | fp8 where quantized
    amax: float | None = None  # activation amax used (attention: the q input's)
    amax_source: str | None = None  # "calibration" | "sample run" | "fixed"


@dataclass
class QuantizeResult:
    path: Path
    precision: str
    level: float
    counts: dict[str, dict[str, int]]  # kind -> {"quantized": n, "total": n}
    decisions: list[Decision]
    calibration: str  # where the activation ranges came from
    seconds: float
    qdq_pairs: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{c['quantized']}/{c['total']} {k}" for k, c in self.counts.items()]
        return f"{self.precision.upper()} level {self.level:g}: " + ", ".join(parts) + " quantized"

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "precision": self.precision, "level": self.level, "counts": self.counts,
                "calibration": self.calibration, "seconds": round(self.seconds, 3), "qdq_pairs": self.qdq_pairs,
                "notes": self.notes,
                "decisions": [{"module": d.module, "kind": d.kind, "quantized": d.quantized, "type": d.type,
                               "reason": d.reason, "amax": d.amax, "amax_source": d.amax_source}
                              for d in self.decisions]}


# --------------------------------------------------------------------------- decisions

def matches_pattern(name: str, pattern: str) -> bool:
    """Glob (`*attn2*`) when the pattern has wildcards, else a substring of the module name (the
    demo's `.*(conv_in|...).*` regex works the same way)."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def _first_match(name: str, pats: Iterable[str]) -> str | None:
    return next((p for p in pats if matches_pattern(name, p)), None)


def resolve_level(precision: str, level: float | None) -> float:
    if level is None:
        return 4.0 if precision == "fp8" else 3.0
    lv = float(level)
    if lv not in LEVELS:
        raise TrtkitError(f"quantization level {level:g} is not one of {', '.join(f'{x:g}' for x in LEVELS)}")
    return lv


def _level_admits(m: WeightedMatch, level: float) -> tuple[bool, str]:
    if m.kind == "conv":
        return True, "conv (level >= 1)"
    leaf = m.module.split(".")[-1]
    if level >= 3:
        return True, "linear (level >= 3)"
    if level >= 2.5 and leaf in QKV_LEAVES:
        return True, "q/k/v projection (level >= 2.5)"
    if level >= 2 and "ff.net" in m.module:
        return True, "feed-forward linear (level >= 2)"
    need = 2 if "ff.net" in m.module else 2.5 if leaf in QKV_LEAVES else 3
    return False, f"level {level:g} quantizes no such linear (needs level >= {need:g})"


def decide(matches: Matches, cfg: QuantizeConfig, level: float) -> dict[str, Decision]:
    """Per module: quantize or not, and why. Explicit exclude beats include beats defaults and level."""
    out: dict[str, Decision] = {}
    defaults = DEFAULT_EXCLUDE if cfg.default_exclusions else ()
    for m in (*matches.conv, *matches.linear):
        if (p := _first_match(m.module, cfg.exclude)) is not None:
            out[m.module] = Decision(m.module, m.kind, False, f"excluded by --exclude {p}")
        elif (p := _first_match(m.module, cfg.include)) is not None:
            out[m.module] = Decision(m.module, m.kind, True, f"included by --include {p}", cfg.precision)
        elif (p := _first_match(m.module, defaults)) is not None:
            out[m.module] = Decision(m.module, m.kind, False, f"default exclusion ({p})")
        else:
            ok, why = _level_admits(m, level)
            out[m.module] = Decision(m.module, m.kind, ok, why, cfg.precision if ok else None)
    want_attn = cfg.quantize_attention if cfg.quantize_attention is not None else (
        cfg.precision == "fp8" and level >= 4)
    for a in matches.attention:
        if (p := _first_match(a.module, cfg.exclude)) is not None:
            d = Decision(a.module, "attention", False, f"excluded by --exclude {p}")
        elif not want_attn and _first_match(a.module, cfg.include) is None:
            if cfg.precision == "int8":
                why = "INT8 leaves attention in FP16 (--attention forces it; in Python quantize_attention=True)"
            else:
                why = f"level {level:g} leaves attention unquantized (FP8 attention is level 4)"
            d = Decision(a.module, "attention", False, why)
        elif a.head_size is None:
            d = Decision(a.module, "attention", False, "head size unknown: cannot check the fused-attention rule")
        elif a.head_size % 16:
            d = Decision(a.module, "attention", False,
                         f"head size {a.head_size} is not a multiple of 16 (TensorRT fused 8-bit attention)")
        else:
            d = Decision(a.module, "attention", True, f"attention BMMs and softmax (head size {a.head_size})",
                         cfg.precision)
        out[a.module] = d
    return out


# --------------------------------------------------------------------------- numbers

def _round_scale(scale: np.ndarray, fp16: bool) -> np.ndarray:
    """Scales as stored: float32, FP16-representable (and normal) when the graph goes FP16, so the
    conversion to FP16 later changes nothing."""
    s = np.asarray(scale, dtype=np.float32)
    if fp16:
        s = np.maximum(s, FP16_MIN_NORMAL).astype(np.float16).astype(np.float32)
    else:
        s = np.maximum(s, 1e-12).astype(np.float32)
    return np.asarray(s, dtype=np.float32)


def act_scale(amax: float, precision: str, fp16: bool) -> np.ndarray:
    return _round_scale(np.array(max(float(amax), 0.0) / QMAX[precision], np.float32), fp16)


def quantize_weight(w: np.ndarray, axis: int, precision: str, fp16: bool) -> tuple[np.ndarray, np.ndarray]:
    """(8-bit weight as raw-typed numpy: int8, or uint8 bytes of E4M3, per-channel float32 scale)."""
    w = np.asarray(w, dtype=np.float32)
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=red) if red else np.abs(w)
    scale = _round_scale(amax / QMAX[precision], fp16)
    shape = [1] * w.ndim
    shape[axis] = -1
    x = w / scale.reshape(shape)
    if precision == "int8":
        return np.clip(np.rint(x), -128, 127).astype(np.int8), scale
    try:
        import ml_dtypes
    except ImportError as e:  # onnx >= 1.18 brings it
        raise TrtkitError("FP8 weights need the ml_dtypes package; pip install ml_dtypes") from e

    return np.clip(x, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn).view(np.uint8), scale


def dequantize_weight(q: np.ndarray, scale: np.ndarray, axis: int, precision: str) -> np.ndarray:
    """The reference of what DequantizeLinear computes (tests use it)."""
    if precision == "int8":
        x = q.astype(np.float32)
    else:
        import ml_dtypes

        x = q.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    shape = [1] * q.ndim
    shape[axis] = -1
    return x * scale.reshape(shape)


def _typed_const(name: str, data: np.ndarray, precision: str) -> gs.Constant:
    """An INT8 / FP8 initializer as a TensorProto wrapped for graphsurgeon (which has no FP8 numpy type)."""
    proto = onnx.helper.make_tensor(name, ONNX_QTYPE[precision], list(data.shape),
                                    vals=np.ascontiguousarray(data).tobytes(), raw=True)
    return gs.Constant(name, LazyValues(proto))


# --------------------------------------------------------------------------- calibration

def _sample_feeds(model: onnx.ModelProto, profile: str, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs of the profile's opt shapes, sized from the graph's own input dims."""
    from trtkit.exporter import example_inputs
    from trtkit.profiles import ModelDims, get_profile

    ins = {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
           for i in model.graph.input}
    inits = {i.name for i in model.graph.initializer}
    ins = {k: v for k, v in ins.items() if k not in inits}
    component = next((p.value for p in model.metadata_props if p.key == "trtkit.component"), None)
    if component is None:
        component = "unet" if "sample" in ins else "vae_decoder" if "latent" in ins else (
            "text_encoder" if "input_ids" in ins else None)
    shapes = None
    if component is not None:
        kw: dict[str, Any] = {}
        if "sample" in ins and ins["sample"][1]:
            kw["latent_channels"] = ins["sample"][1]
        if "latent" in ins and ins["latent"][1]:
            kw["latent_channels"] = ins["latent"][1]
        if "encoder_hidden_states" in ins and ins["encoder_hidden_states"][-1]:
            kw["cross_attention_dim"] = ins["encoder_hidden_states"][-1]
        if "text_embeds" in ins and ins["text_embeds"][-1]:
            kw["text_embeds_dim"] = ins["text_embeds"][-1]
        if "time_ids" in ins and ins["time_ids"][-1]:
            kw["time_ids_len"] = ins["time_ids"][-1]
        downs = {n.name.split("/down_blocks.")[1].split("/")[0] for n in model.graph.node
                 if "/down_blocks." in n.name}
        if downs:
            kw["down_levels"] = len(downs)
        try:
            shapes = get_profile(profile).shapes(component, ModelDims(**kw))
        except TrtkitError:
            shapes = None
        if shapes is not None and set(shapes) != set(ins):
            shapes = None
    if shapes is None:  # not a trtkit-shaped graph: static dims, 1 for the symbolic ones
        from trtkit.profiles import ShapeRange

        shapes = {k: ShapeRange.fixed(tuple(d or 1 for d in v)) for k, v in ins.items()}
    feeds = example_inputs(shapes, "opt", seed)
    want = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    for k, v in list(feeds.items()):  # match the graph's input types (int32/int64 ids, fp16 I/O)
        np_t = onnx.helper.tensor_dtype_to_np_dtype(want[k]) if k in want else v.dtype
        feeds[k] = v.astype(np_t)
    return feeds


@contextmanager
def _big_allocs_unmapped_on_free() -> Iterator[None]:
    """glibc only: serve allocations >= 1 MiB with mmap and give them back on free, while the sample run
    allocates and frees its activations (glibc's dynamic threshold otherwise keeps freed 10-100 MB tensors
    in a fragmented heap: 1.3 GiB more peak on an SD 1.5 UNet). Placement only; the numbers are the same."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        yield
        return
    m_trim, m_mmap = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD (malloc.h)
    mallopt(m_mmap, 1 << 20)
    mallopt(m_trim, 1 << 20)
    try:
        yield
    finally:  # glibc's defaults (128 KiB) for the rest of the pass
        mallopt(m_mmap, 128 << 10)
        mallopt(m_trim, 128 << 10)


def max_calibrate(model: onnx.ModelProto, tensors: list[str], profile: str, seed: int = 0,
                  base_dir: Path | None = None) -> dict[str, float]:
    """amax of each tensor over one onnxruntime run on sample inputs.

    Memory: on a copy of the model each tensor gets Cast(float) -> Abs -> ReduceMax and only those
    scalars are graph outputs, so a tensor is freed as soon as its readers ran instead of all of them
    being held to the end of the run (max and abs are exact: the same numbers as numpy on the full
    tensor); the CPU arena is off so onnxruntime's peak is the live tensors, not a high-water pool."""
    if not tensors:
        return {}
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise TrtkitError("without a calibration file the pass measures ranges with onnxruntime, which is not "
                          "installed; pip install onnxruntime or pass --calib") from e
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = {n.name for n in m.graph.node}
    taken = {*names, *(t for n in m.graph.node for t in (*n.input, *n.output)),
             *(i.name for i in m.graph.input), *(i.name for i in m.graph.initializer)}

    def _fresh(base: str) -> str:
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    del m.graph.output[:]  # the model's own outputs are not needed: only the amax scalars come back
    outs: list[str] = []
    for i, t in enumerate(tensors):
        f, a, r = _fresh(f"trtkit_amax_{i}/f32"), _fresh(f"trtkit_amax_{i}/abs"), _fresh(f"trtkit_amax_{i}")
        m.graph.node.extend([
            onnx.helper.make_node("Cast", [t], [f], _fresh(f"trtkit_amax_{i}/Cast"), to=onnx.TensorProto.FLOAT),
            onnx.helper.make_node("Abs", [f], [a], _fresh(f"trtkit_amax_{i}/Abs")),
            onnx.helper.make_node("ReduceMax", [a], [r], _fresh(f"trtkit_amax_{i}/ReduceMax"), keepdims=0),
        ])
        m.graph.output.append(onnx.helper.make_tensor_value_info(r, onnx.TensorProto.FLOAT, []))
        outs.append(r)
    feeds = _sample_feeds(model, profile, seed)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor visible
    opts.enable_cpu_mem_arena = False  # the arena keeps and fragments the 1 GiB attention-score buffers
    opts.enable_mem_pattern = False  # one run: a recorded pattern would never be reused
    try:
        if _has_external(m):  # weights stay in their .data file: run from a file beside it
            import tempfile

            with tempfile.NamedTemporaryFile(suffix=".onnx", prefix=".trtkit-calib-", dir=base_dir) as f:
                f.write(m.SerializeToString())
                f.flush()
                del m
                sess = ort.InferenceSession(f.name, opts, providers=["CPUExecutionProvider"])
        else:
            data = m.SerializeToString()
            del m
            sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
            del data
        with _big_allocs_unmapped_on_free():
            got = sess.run(outs, feeds)
            del sess
    except Exception as e:  # onnxruntime raises its own types
        raise TrtkitError(f"max calibration run failed in onnxruntime: {str(e).splitlines()[0]}") from e
    # an empty tensor reduces to -inf: its amax is 0, as before
    return {t: 0.0 if float(o) == float("-inf") else float(o) for t, o in zip(tensors, got, strict=True)}


# --------------------------------------------------------------------------- graph edits

class _Inserter:
    def __init__(self, graph: gs.Graph, precision: str, fp16: bool) -> None:
        self.g = graph
        self.precision = precision
        self.fp16 = fp16
        self.pairs = 0
        self._zp: gs.Constant | None = None
        self._names: set[str] = {n.name for n in graph.nodes}

    def _unique(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def zero_point(self) -> gs.Constant:
        if self._zp is None:
            name = f"trtkit_qdq_zero_{self.precision}"
            self._zp = _typed_const(name, np.zeros((), np.int8 if self.precision == "int8" else np.uint8),
                                    self.precision)
        return self._zp

    def activation(self, x: gs.Variable, amax: float, prefix: str, consumers: list[tuple[gs.Node, int]]) -> None:
        """x -> Q -> DQ feeding the given (node, input index) slots."""
        scale = gs.Constant(self._unique(f"{prefix}/scale"), act_scale(amax, self.precision, self.fp16))
        qname = self._unique(f"{prefix}/QuantizeLinear")
        # graphsurgeon has no numpy FP8 type: leave the FP8 tensor's type to shape inference
        int8 = self.precision == "int8"
        qout = gs.Variable(f"{qname}_output_0", dtype=np.int8 if int8 else None, shape=x.shape if int8 else None)
        dname = self._unique(f"{prefix}/DequantizeLinear")
        dout = gs.Variable(f"{dname}_output_0", dtype=np.float32, shape=x.shape)
        self.g.nodes.append(gs.Node("QuantizeLinear", qname, inputs=[x, scale, self.zero_point()], outputs=[qout]))
        self.g.nodes.append(gs.Node("DequantizeLinear", dname, inputs=[qout, scale, self.zero_point()],
                                    outputs=[dout]))
        for node, idx in consumers:
            node.inputs[idx] = dout
        self.pairs += 1

    def weight(self, node: gs.Node, w: np.ndarray, axis: int, prefix: str) -> None:
        q, scale = quantize_weight(w, axis, self.precision, self.fp16)
        wq = _typed_const(self._unique(f"{prefix}/weight_quantized"), q, self.precision)
        sc = gs.Constant(self._unique(f"{prefix}/weight_scale"), scale)
        zp = _typed_const(self._unique(f"{prefix}/weight_zero_point"),
                          np.zeros(scale.shape, np.int8 if self.precision == "int8" else np.uint8), self.precision)
        dname = self._unique(f"{prefix}/weight_quantizer/DequantizeLinear")
        dout = gs.Variable(f"{dname}_output_0", dtype=np.float32, shape=list(w.shape))
        self.g.nodes.append(gs.Node("DequantizeLinear", dname, attrs={"axis": axis}, inputs=[wq, sc, zp],
                                    outputs=[dout]))
        node.inputs[1] = dout

    def mul(self, x: gs.Variable, vec: np.ndarray, prefix: str) -> gs.Variable:
        c = gs.Constant(self._unique(f"{prefix}/smooth_inv"), np.asarray(vec, np.float32))
        name = self._unique(f"{prefix}/smooth/Mul")
        out = gs.Variable(f"{name}_output_0", dtype=np.float32, shape=x.shape)
        self.g.nodes.append(gs.Node("Mul", name, inputs=[x, c], outputs=[out]))
        return out


def _has_external(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _float_values(t: gs.Constant, base_dir: Path | None = None) -> np.ndarray:
    """A constant's values as float32 without caching them in the graph (a 3 GB model's FP32 weights
    are read one at a time, quantized and dropped); external data is read from base_dir."""
    lazy = t._values if isinstance(t._values, LazyValues) else None
    if lazy is None:
        return np.asarray(t.values, dtype=np.float32)
    proto = lazy.tensor
    if proto.data_location == onnx.TensorProto.EXTERNAL:
        from onnx.external_data_helper import load_external_data_for_tensor

        tmp = onnx.TensorProto()
        tmp.CopyFrom(proto)
        load_external_data_for_tensor(tmp, str(base_dir or "."))
        tmp.data_location = onnx.TensorProto.DEFAULT
        del tmp.external_data[:]
        return np.asarray(onnx.numpy_helper.to_array(tmp), dtype=np.float32)
    return np.asarray(onnx.numpy_helper.to_array(proto), dtype=np.float32)


def _materialize_external(graph: gs.Graph, base_dir: Path) -> None:
    """Read the external data of the constants still in the graph (the unquantized ones) into the
    graph, so it no longer points at the source's .data file."""
    from onnx.external_data_helper import load_external_data_for_tensor

    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues):
            proto = t._values.tensor
            if proto.data_location == onnx.TensorProto.EXTERNAL:
                load_external_data_for_tensor(proto, str(base_dir))
                proto.data_location = onnx.TensorProto.DEFAULT
                del proto.external_data[:]


def _prefix(m: WeightedMatch | AttentionMatch) -> str:
    """Names of inserted nodes continue the op's own scope (`/unet/.../to_q/input_quantizer/QuantizeLinear`,
    as ModelOpt names them), so later passes and the builder's layer names still read as modules."""
    node = m.node if isinstance(m, WeightedMatch) else m.bmm1
    if "/" in node.strip("/"):
        return node.rsplit("/", 1)[0]
    return m.module


def _fold_smooth_into_layernorm(x: gs.Variable, s: np.ndarray, base_dir: Path) -> bool:
    """x = LayerNorm(...) read only by the smoothed ops: divide gamma and beta by s instead of adding a Mul."""
    p = patterns.producer(x)
    if p is None or p.op != "LayerNormalization" or len(p.inputs) < 2:
        return False
    if not all(isinstance(t, gs.Constant) for t in p.inputs[1:3] if t is not None):
        return False
    gamma = _float_values(p.inputs[1], base_dir)
    if gamma.shape != s.shape:
        return False
    p.inputs[1] = gs.Constant(f"{p.name}/gamma_smoothed", (gamma / s).astype(np.float32))
    if len(p.inputs) > 2 and p.inputs[2] is not None:
        p.inputs[2] = gs.Constant(f"{p.name}/beta_smoothed", (_float_values(p.inputs[2], base_dir) / s).astype(np.float32))
    return True


# --------------------------------------------------------------------------- the verb

def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def quantize(cfg: QuantizeConfig) -> QuantizeResult:
    """Insert Q/DQ into `cfg.onnx_path` and write `cfg.output` (and its .data file when > 2 GB)."""
    with patterns.quiet_gs():
        return _quantize(cfg)


def _quantize(cfg: QuantizeConfig) -> QuantizeResult:
    t0 = time.perf_counter()
    if cfg.precision not in PRECISIONS:
        raise TrtkitError(f"precision {cfg.precision!r} is not one of {', '.join(PRECISIONS)}")
    level = resolve_level(cfg.precision, cfg.level)
    src = Path(cfg.onnx_path)
    calib = [Path(cfg.calib), Path(cfg.calib).with_suffix(".safetensors")] if cfg.calib is not None else []
    dest = check_output(cfg.output, default_name=f"{src.stem}.{cfg.precision}.onnx", what="output ONNX",
                        inputs=[src, src.parent / (src.name + ".data"), *calib],
                        sidecars=lambda o: [o.parent / (o.name + ".data")])
    if cfg.io_dtype not in ("float32", "float16"):
        raise TrtkitError(f"io_dtype {cfg.io_dtype!r} is not float32 or float16")
    cal = None
    if cfg.calib is not None:
        from trtkit.calibfile import check_model
        from trtkit.calibfile import load as load_calib

        cal = load_calib(cfg.calib)
    model = load_onnx(src, external=False, needs_data=True)  # weights are read one by one when quantized
    opset = _opset(model)
    if opset < 13:
        raise TrtkitError(f"{src.name} has opset {opset}; per-channel Q/DQ needs opset >= 13 (re-export with 19)")
    if cfg.precision == "fp8" and opset < 19:
        raise TrtkitError(f"{src.name} has opset {opset}; FP8 Q/DQ needs opset >= 19 (re-export with 19)")
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise TrtkitError(f"{src.name} already contains QuantizeLinear/DequantizeLinear nodes; "
                          "quantize the unquantized export")
    meta = {p.key: p.value for p in model.metadata_props}
    graph = gs.import_onnx(model)
    matches = patterns.find(graph, patterns.scope_of(meta))
    if matches.empty:
        raise TrtkitError(f"nothing matched in {src.name}: no linear (MatMul/Gemm with a constant weight), "
                          "conv or attention (MatMul-Softmax-MatMul) pattern; nothing to quantize")
    known = matches.modules()
    if cal is not None:
        cal.check_modules(known, where=src.name)
        check_model(cal, meta.get("trtkit.source"), src.name)
    decisions = decide(matches, cfg, level)

    # Activation tensors to quantize: tensor -> [(match, consumer node)], one Q/DQ per tensor and
    # SmoothQuant vector.
    nodes = {n.name: n for n in graph.nodes}
    tensors = graph.tensors()
    w_q = [m for m in (*matches.conv, *matches.linear) if decisions[m.module].quantized]
    a_q = [a for a in matches.attention if decisions[a.module].quantized]

    def _smooth(m: WeightedMatch) -> np.ndarray | None:
        if cal is None or m.module not in cal.smooth:
            return None
        s = np.asarray(cal.smooth[m.module], np.float32).reshape(-1)
        w_const = patterns._const_weight(nodes[m.node].inputs[1])[0]
        assert w_const is not None  # the finder matched on it
        w_shape = w_const.shape
        if s.shape[0] != w_shape[m.in_axis] or np.any(~np.isfinite(s)) or np.any(s <= 0):
            raise TrtkitError(f"SmoothQuant vector of {m.module} has length {s.shape[0]} or non-positive values; "
                              f"the weight has {w_shape[m.in_axis]} input channels")
        return s

    # amax per (module or attention role): calibration first, the sample run for the rest.
    amax: dict[str, float] = {}
    source: dict[str, str] = {}
    need_run: dict[str, str] = {}  # key -> tensor
    for m in w_q:
        got = cal.amax(m.module) if cal is not None else None
        if got is not None:
            amax[m.module], source[m.module] = got, "calibration"
        else:
            need_run[m.module] = m.input
    for a in a_q:
        for role, t in (("q_bmm", a.q), ("k_bmm", a.k), ("v_bmm", a.v)):
            key = f"{a.module}.{role}"
            got = cal.amax(key) if cal is not None else None
            if got is not None:
                amax[key], source[key] = got * _prescale_factor(nodes, a, role), "calibration"
            else:
                need_run[key] = t
        amax[f"{a.module}.softmax"], source[f"{a.module}.softmax"] = 1.0, "fixed"  # probabilities are <= 1
    calibration = "calibration file" if cal is not None else "max over a sample run"
    if need_run:
        smoothed = [k for k in need_run if cal is not None and k in cal.smooth]
        if smoothed:
            raise TrtkitError(f"calibration has a SmoothQuant vector but no amax for {smoothed[0]}")
        run = max_calibrate(model, sorted(set(need_run.values())), cfg.profile, cfg.seed, base_dir=src.parent)
        for k, t in need_run.items():
            amax[k], source[k] = run[t], "sample run"
        if cal is not None:
            calibration = f"calibration file ({len(need_run)} ranges from a sample run)"
            # Loud: these ranges come from random sample inputs, not the prompts the file was made with.
            log.warning("the calibration file has no range for %d of the %d inputs quantized here (e.g. %s): "
                        "they come from a max calibration on sample inputs, not from your prompts; calibrate "
                        "at this level (trtkit calibrate --level) for real ranges", len(need_run),
                        len(need_run) + sum(v == "calibration" for v in source.values()), sorted(need_run)[0])
    del model

    def _insert(g: gs.Graph) -> int:
        """Rewire the graph; its many references to graph objects end with this call, so the graph
        can be freed after the export."""
        ins = _Inserter(g, cfg.precision, cfg.fp16)
        # Weights first (SmoothQuant scales their input channels).
        groups: dict[tuple[str, bytes | None], list[WeightedMatch]] = {}
        smooth_of: dict[str, np.ndarray | None] = {}
        for m in w_q:
            node = nodes[m.node]
            const = patterns._const_weight(node.inputs[1])[0]
            w = _float_values(const, src.parent)
            s = _smooth(m)
            smooth_of[m.module] = s
            if s is not None:
                shape = [1] * w.ndim
                shape[m.in_axis] = -1
                w = w * s.reshape(shape)
            ins.weight(node, w, m.axis, _prefix(m))
            groups.setdefault((m.input, None if s is None else s.tobytes()), []).append(m)
        # Activations: one Q/DQ per (tensor, smoothing).
        by_tensor: dict[str, list[tuple[str, bytes | None]]] = {}
        for gkey in groups:
            by_tensor.setdefault(gkey[0], []).append(gkey)
        for tname, keys in by_tensor.items():
            x = tensors[tname]
            # readers that see values (Shape only reads the shape, so a folded LayerNorm does not bother it)
            other_readers = [c for c in x.outputs if c.name not in {m.node for k in keys for m in groups[k]}
                             and c.op != "Shape"]
            for gkey in keys:
                ms = groups[gkey]
                src_t = x
                vec = smooth_of[ms[0].module]
                if vec is not None and not (len(keys) == 1 and not other_readers
                                            and _fold_smooth_into_layernorm(x, vec, src.parent)):
                    src_t = ins.mul(x, (1.0 / vec).astype(np.float32), _prefix(ms[0]))
                slots = [(nodes[m.node], 0) for m in ms]
                shared = max(amax[m.module] for m in ms)
                ins.activation(src_t, shared, _prefix(ms[0]) + "/input_quantizer", slots)
                for m in ms:
                    decisions[m.module] = _with_amax(decisions[m.module], shared, source[m.module])
        for a in a_q:
            b1, b2 = nodes[a.bmm1], nodes[a.bmm2]
            p = _prefix(a)
            ins.activation(tensors[a.q], amax[f"{a.module}.q_bmm"], f"{p}/q_bmm_quantizer", [(b1, 0)])
            ins.activation(tensors[a.k], amax[f"{a.module}.k_bmm"], f"{p}/k_bmm_quantizer", [(b1, 1)])
            ins.activation(tensors[a.v], amax[f"{a.module}.v_bmm"], f"{p}/v_bmm_quantizer", [(b2, 1)])
            ins.activation(tensors[a.probs], 1.0, f"{p}/softmax_quantizer", [(b2, 0)])
            decisions[a.module] = _with_amax(decisions[a.module], amax[f"{a.module}.q_bmm"],
                                             source[f"{a.module}.q_bmm"])
        return ins.pairs

    pairs = _insert(graph)
    graph.cleanup()
    _materialize_external(graph, src.parent)
    notes = list(matches.notes)
    if cal is not None and cal.precision and cal.precision != cfg.precision:
        notes.append(f"the calibration file was made for {cal.precision}; its ranges are used for {cfg.precision}")
    if cfg.fp16:
        from trtkit.graph.fp16 import to_fp16

        keep = set()
        for a in a_q:  # TensorRT has FP32-accumulation kernels only for 8-bit MHA: keep its core FP32
            keep |= _attention_core(nodes, a)
        stats = to_fp16(graph, keep_fp32_nodes=keep, io_dtype=cfg.io_dtype)
        notes.append(f"FP16 elsewhere ({stats.summary()})")
    graph.cleanup().toposort()

    ordered = [decisions[mod] for mod in [*(x.module for x in matches.linear), *(x.module for x in matches.conv),
                                          *(x.module for x in matches.attention)]]
    counts: dict[str, dict[str, int]] = {}
    for kind in ("linear", "conv", "attention"):
        ds = [d for d in ordered if d.kind == kind]
        counts[kind] = {"quantized": sum(d.quantized for d in ds), "total": len(ds)}
    meta[META_KEY] = json.dumps({"precision": cfg.precision, "level": level, "calibration": calibration,
                                 "fp16": cfg.fp16,
                                 "decisions": {d.module: [d.kind, d.quantized, d.type, d.reason] for d in ordered}})
    out_model = gs.export_onnx(graph)
    # the export copied every initializer: drop the graph's own copies before writing
    nodes.clear()
    tensors.clear()
    del graph
    import gc

    gc.collect()
    out_model.ir_version = max(out_model.ir_version, 9)
    _set_meta(out_model, meta)
    holder = [out_model]
    del out_model
    write_model(holder, dest)
    result = QuantizeResult(path=dest, precision=cfg.precision, level=level, counts=counts, decisions=ordered,
                            calibration=calibration, seconds=time.perf_counter() - t0, qdq_pairs=pairs,
                            notes=notes)
    skipped_attn = [d for d in ordered if d.kind == "attention" and not d.quantized and "head size" in d.reason]
    if skipped_attn:
        result.notes.append(f"{len(skipped_attn)} attention block(s) left out: {skipped_attn[0].reason}")
    return result


def _with_amax(d: Decision, amax: float, source: str) -> Decision:
    from dataclasses import replace

    return replace(d, amax=float(amax), amax_source=source)


def _prescale_factor(nodes: dict[str, gs.Node], a: AttentionMatch, role: str) -> float:
    """Calibration ranges of q_bmm/k_bmm are of the query/key as the attention gets them (as
    ModelOpt's quantizers see them); the SDPA export multiplies each by scale**0.5 = head**-0.25
    before the first BMM, and Q/DQ sits after that Mul so the DQ feeds the BMM directly."""
    mul = a.q_prescale if role == "q_bmm" else a.k_prescale if role == "k_bmm" else None
    if mul is None or a.head_size is None:
        return 1.0
    n = nodes[mul]
    c = next((t for t in n.inputs if isinstance(t, gs.Constant)), None)
    if c is not None and c.values.size == 1:
        return abs(float(np.asarray(c.values).reshape(-1)[0]))
    return float(a.head_size) ** -0.25


def _attention_core(nodes: dict[str, gs.Node], a: AttentionMatch) -> set[str]:
    """bmm1 .. softmax .. bmm2 and the pre-scale Muls: the FP32 island of an 8-bit attention."""
    keep = {a.bmm1, a.softmax, a.bmm2}
    keep |= {n for n in (a.q_prescale, a.k_prescale) if n}
    t = nodes[a.softmax].inputs[0]
    p = patterns.producer(t)
    while p is not None and p.name != a.bmm1 and p.op in ("Mul", "Div", "Add", "Cast", "Where"):
        keep.add(p.name)
        p = patterns.producer(p.inputs[0])
    return keep


def _set_meta(model: onnx.ModelProto, props: dict[str, str]) -> None:
    del model.metadata_props[:]
    for k, v in props.items():
        e = model.metadata_props.add()
        e.key, e.value = k, v


def write_model(model: onnx.ModelProto | list[onnx.ModelProto], dest: Path, check: bool = True) -> Path:
    """Write atomically (external data past 2 GB), then shape-infer (strict) and check the written
    file. The proto is consumed: pass it in a one-item list to let it be freed right after saving,
    since shape inference and the checker then work from the file in C++."""
    if isinstance(model, list):
        model = model.pop()
    with staged_onnx(model, dest, strict=True, check=check):
        pass
    return dest
