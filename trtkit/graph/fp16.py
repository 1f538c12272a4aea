"""Strongly typed FP16: every float tensor FP16 except FP32 islands where precision needs it, with
explicit Casts at the island borders (TensorRT 11 / TensorRT-RTX build only what the types say).

Our own pass rather than nvidia-modelopt's AutoCast (`trtkit[modelopt]`; benchmarks/bench_fp16.py
compares the two): the pass must place Q/DQ scales in the type of the region that reads them, which
AutoCast does not know about, and it runs without torch.

FP32 islands by default:
* `InstanceNormalization` (diffusers' GroupNorm): ONNX gives it no FP32 accumulation attribute
  (LayerNormalization has `stash_type=1`, so it stays FP16 safely);
* the q/k RMSNorms of DiT attention (`norm_q`, `norm_k`, `norm_added_q`, `norm_added_k`), exported as
  Pow/ReduceMean/Sqrt: the squares overflow FP16 past |x| = 256 (TensorRT warns of it);
* the sinusoidal timestep / time-id embeddings (`time_proj`, `add_time_proj`, Sin/Cos): timesteps up to
  1000 and time ids of 1024 lose their fractional part in FP16, as diffusers keeps them FP32 too;
* whatever the caller names (the Q/DQ pass keeps 8-bit attention cores FP32: TensorRT has FP32
  accumulation kernels only for 8-bit MHA).
`Resize` roi/scales stay FP32 (the ONNX schema types them float).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from trtkit.errors import TrtkitError
from trtkit.graph.external import Streamer
from trtkit.graph.onnx_io import has_external, load_onnx, set_meta, write_model
from trtkit.graph.patterns import quiet_gs
from trtkit.graph.scales import FP16_MIN_NORMAL

log = logging.getLogger(__name__)

DEFAULT_KEEP_FP32_OPS = ("InstanceNormalization", "Sin", "Cos")
# the DiTs' q/k RMSNorms (FLUX, SD3.5) export as Pow/ReduceMean/Sqrt: in FP16, x^2 overflows past |x| = 256
FP32_SCOPES = ("time_proj", "add_time_proj", "norm_q", "norm_k", "norm_added_q", "norm_added_k")
FP32_ONLY_INPUTS = {("Resize", 1), ("Resize", 2)}
SCALE_INPUTS = {("QuantizeLinear", 1), ("DequantizeLinear", 1)}
F32, F16 = np.dtype(np.float32), np.dtype(np.float16)


@dataclass
class Fp16Stats:
    fp16_nodes: int = 0
    fp32_nodes: int = 0
    casts: int = 0

    def summary(self) -> str:
        return f"{self.fp16_nodes} nodes FP16, {self.fp32_nodes} kept FP32, {self.casts} casts"


def _is_float(t: gs.Tensor, dt: np.dtype) -> bool:
    try:
        return t.dtype is not None and np.dtype(t.dtype) == dt
    except TypeError:  # ONNX-only types (FLOAT8E4M3FN, given as a TensorProto int) have no numpy dtype
        return False


def _in_fp32_scope(name: str) -> bool:
    return any(p in FP32_SCOPES for p in name.split("/"))


def to_fp16(graph: gs.Graph, keep_fp32_nodes: Iterable[str] = (), keep_fp32_ops: Iterable[str] = DEFAULT_KEEP_FP32_OPS,
            io_dtype: str = "float32", streamer: Streamer | None = None) -> Fp16Stats:
    """Convert a graph in place. Float32 tensors become float16 unless read/written by an FP32 island.
    With a `streamer`, external FP32 weights become FP16 stand-ins converted when the output is written."""
    if io_dtype not in ("float32", "float16"):
        raise TrtkitError(f"io_dtype {io_dtype!r} is not float32 or float16")
    keep_nodes, keep_ops = set(keep_fp32_nodes), set(keep_fp32_ops)
    stats = Fp16Stats()
    fp32: dict[int, bool] = {}  # id(node) -> stays FP32

    def plain(n: gs.Node) -> bool:
        return n.name in keep_nodes or n.op in keep_ops or _in_fp32_scope(n.name or "")

    qdq = [n for n in graph.nodes if n.op in ("QuantizeLinear", "DequantizeLinear")]
    for n in graph.nodes:
        if n.op not in ("QuantizeLinear", "DequantizeLinear", "Constant"):
            fp32[id(n)] = plain(n)

    def region_of_readers(t: gs.Tensor) -> bool:
        readers = [c for c in t.outputs if id(c) in fp32]
        return bool(readers) and all(fp32[id(c)] for c in readers)

    # A Q/DQ pair takes the type of the region its DQ feeds (the scale's type is the DQ output type).
    for n in qdq:
        if n.op == "DequantizeLinear":
            fp32[id(n)] = region_of_readers(n.outputs[0])
    for n in qdq:
        if n.op == "QuantizeLinear":
            dqs = [c for c in n.outputs[0].outputs if id(c) in fp32]
            fp32[id(n)] = bool(dqs) and all(fp32[id(c)] for c in dqs)
    for n in graph.nodes:
        if n.op == "Constant":
            fp32[id(n)] = not any(not fp32.get(id(c), True) for c in n.outputs[0].outputs)

    # Graph inputs in the I/O type.
    if io_dtype == "float16":
        for t in graph.inputs:
            if _is_float(t, F32):
                t.dtype = F16

    # Outputs of FP16 nodes become FP16.
    for n in graph.nodes:
        if fp32[id(n)]:
            stats.fp32_nodes += 1
            _island_fp32(n)  # a graph exported with 16-bit weights has FP16 tensors inside the islands too
            continue
        stats.fp16_nodes += 1
        if n.op == "Cast" and n.attrs.get("to") == onnx.TensorProto.FLOAT:
            n.attrs["to"] = onnx.TensorProto.FLOAT16
        elif n.op == "ConstantOfShape" and isinstance(n.attrs.get("value"), gs.Constant):
            v = n.attrs["value"]
            if _is_float(v, F32):
                n.attrs["value"] = gs.Constant(v.name, np.asarray(v.values, np.float16))
        elif n.op == "Constant" and isinstance(n.attrs.get("value"), gs.Constant):
            v = n.attrs["value"]
            if _is_float(v, F32):
                n.attrs["value"] = gs.Constant(v.name, np.asarray(v.values, np.float16))
        for o in n.outputs:
            if _is_float(o, F32):
                o.dtype = F16
            elif n.op == "DequantizeLinear" or (n.op == "Cast" and n.attrs.get("to") == onnx.TensorProto.FLOAT16):
                o.dtype = F16

    consts: dict[tuple[str, str], gs.Constant] = {}
    casts: dict[tuple[str, str], gs.Variable] = {}
    new_nodes: list[gs.Node] = []

    def const_as(c: gs.Constant, dt: np.dtype, scale: bool) -> gs.Constant:
        key = (c.name, dt.name)
        if key not in consts and streamer is not None and dt == F16 and not scale:
            stub = streamer.fp16(c)
            if stub is not None:
                consts[key] = stub
        if key not in consts:
            v = np.asarray(c.values)
            if scale and dt == F16:
                v = np.maximum(np.abs(v), FP16_MIN_NORMAL)
            consts[key] = gs.Constant(f"{c.name}_{'fp16' if dt == F16 else 'fp32'}", np.asarray(v, dtype=dt))
        return consts[key]

    def cast_as(t: gs.Variable, dt: np.dtype) -> gs.Variable:
        key = (t.name, dt.name)
        if key not in casts:
            out = gs.Variable(f"{t.name}_cast_{'fp16' if dt == F16 else 'fp32'}", dtype=dt, shape=t.shape)
            to = onnx.TensorProto.FLOAT16 if dt == F16 else onnx.TensorProto.FLOAT
            new_nodes.append(gs.Node("Cast", f"{t.name}/Cast_{'fp16' if dt == F16 else 'fp32'}",
                                     attrs={"to": to}, inputs=[t], outputs=[out]))
            casts[key] = out
            stats.casts += 1
        return casts[key]

    for n in list(graph.nodes):
        if n.op == "Cast":
            continue  # Cast reads any type
        want = F32 if fp32[id(n)] else F16
        other = F16 if want == F32 else F32
        for i, t in enumerate(n.inputs):
            if t is None or (isinstance(t, gs.Variable) and t.name == ""):
                continue
            target = F32 if (n.op, i) in FP32_ONLY_INPUTS else want
            wrong = F16 if target == F32 else F32
            if not _is_float(t, wrong):
                continue
            if isinstance(t, gs.Constant):
                n.inputs[i] = const_as(t, target, (n.op, i) in SCALE_INPUTS)
            else:
                n.inputs[i] = cast_as(t, target)
        del other
    graph.nodes.extend(new_nodes)

    # Graph outputs in the I/O type.
    want_io = F16 if io_dtype == "float16" else F32
    for t in list(graph.outputs):
        cur = np.dtype(t.dtype) if t.dtype is not None else None
        if cur not in (F16, F32) or cur == want_io:
            continue
        inner = gs.Variable(f"{t.name}_{cur.name}", dtype=cur, shape=t.shape)
        for p in list(t.inputs):
            p.outputs[p.outputs.index(t)] = inner
        for c in list(t.outputs):
            for j, x in enumerate(c.inputs):
                if x is t:
                    c.inputs[j] = inner
        to = onnx.TensorProto.FLOAT16 if want_io == F16 else onnx.TensorProto.FLOAT
        graph.nodes.append(gs.Node("Cast", f"{t.name}/Cast_io", attrs={"to": to}, inputs=[inner], outputs=[t]))
        t.dtype = want_io
        stats.casts += 1
    return stats


def _island_fp32(n: gs.Node) -> None:
    """An FP32-island node of a graph exported in FP16 (trtkit.exporter's `dtype`): its casts to FP16,
    FP16 constants and FP16 outputs become FP32, the mirror of what FP16 nodes get; the input loop then
    casts what flows in."""
    if n.op == "Cast" and n.attrs.get("to") == onnx.TensorProto.FLOAT16:
        n.attrs["to"] = onnx.TensorProto.FLOAT
    elif n.op in ("Constant", "ConstantOfShape") and isinstance(n.attrs.get("value"), gs.Constant):
        v = n.attrs["value"]
        if _is_float(v, F16):
            n.attrs["value"] = gs.Constant(v.name, np.asarray(v.values, np.float32))
    if n.op in ("QuantizeLinear", "DequantizeLinear"):
        return  # their output types follow their scales
    for o in n.outputs:
        if _is_float(o, F16):
            o.dtype = F32


def convert_fp16(onnx_path: Path | str, output: Path | str, *, io_dtype: str = "float32",
                 keep_fp32_ops: Iterable[str] = DEFAULT_KEEP_FP32_OPS, keep_fp32_nodes: Iterable[str] = ()) -> Path:
    """FP32 ONNX (with or without Q/DQ) -> strongly typed FP16 ONNX at `output`."""
    from trtkit._files import check_output

    src = Path(onnx_path)
    dest = check_output(output, default_name=f"{src.stem}.fp16.onnx", what="output ONNX",
                        inputs=[src, src.parent / (src.name + ".data")],
                        sidecars=lambda o: [o.parent / (o.name + ".data")])
    model = load_onnx(src, external=False)  # the structure; weights stay in the data file when there is one
    streamer = Streamer(src.parent) if has_external(model) else None
    if not any(_elem(i) == onnx.TensorProto.FLOAT for i in (*model.graph.input, *model.graph.output,
                                                              *model.graph.value_info)) and \
            not any(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer):
        raise TrtkitError(f"{src.name} has no FP32 tensors to convert")
    if not model.graph.value_info:  # the pass needs every tensor's type
        model = onnx.shape_inference.infer_shapes(model)
    meta = {p.key: p.value for p in model.metadata_props}
    with quiet_gs():
        graph = gs.import_onnx(model)
        del model
        stats = to_fp16(graph, keep_fp32_nodes=keep_fp32_nodes, keep_fp32_ops=keep_fp32_ops, io_dtype=io_dtype,
                        streamer=streamer)
        log.info("fp16: %s", stats.summary())
        graph.cleanup().toposort()
        out = gs.export_onnx(graph)
        del graph
    meta["trtkit.fp16"] = stats.summary()
    set_meta(out, meta)
    if streamer is not None:
        return streamer.write(out, dest)
    holder = [out]
    del out
    return write_model(holder, dest)


def _elem(vi: onnx.ValueInfoProto) -> int:
    return vi.type.tensor_type.elem_type
