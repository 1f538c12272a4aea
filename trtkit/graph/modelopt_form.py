"""ModelOpt's Q/DQ form, as the pattern finders must read it.

trtkit's pass stores a weight already quantized (an INT8/FP8 initializer straight into
DequantizeLinear, laid out as the op reads it). A UNet quantized with `mtq.quantize` and exported
with ModelOpt's quantizer symbolics keeps the float weight and quantizes it in the graph, in the
torch layout, with the layout change after the DQ:

    W (float initializer) -> QuantizeLinear -> DequantizeLinear -> [Transpose] -> MatMul   (Linear)
    W (float initializer) -> QuantizeLinear -> DequantizeLinear -> Conv                    (Conv2d)

and its FP8 custom ops (`trt::TRT_FP8QuantizeLinear` / `TRT_FP8DequantizeLinear`) until ModelOpt's
FP8QuantExporter turns them into native ones. `weight_dq` finds the constant and its DequantizeLinear
through both forms; the rest of the finders need no change.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

DQ_OPS = ("DequantizeLinear", "TRT_FP8DequantizeLinear")
Q_OPS = ("QuantizeLinear", "TRT_FP8QuantizeLinear")
# Ops that may sit between a weight's DQ and the op that reads it without changing what it is.
_LAYOUT_OPS = ("Transpose", "Cast", "Reshape", "Identity")


@dataclass(frozen=True)
class WeightDQ:
    const: gs.Constant
    dq: gs.Node
    transposed: bool  # a 2-D Transpose sits between the DQ and the op (the constant is [out, in])


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if isinstance(t, gs.Variable) and t.inputs else None


def _constant(t: gs.Tensor) -> gs.Constant | None:
    """A constant, or the constant a Constant node / Cast of one produces."""
    if isinstance(t, gs.Constant):
        return t
    p = _producer(t)
    if p is not None and p.op == "Cast" and isinstance(p.inputs[0], gs.Constant):
        return p.inputs[0]
    if p is not None and p.op == "Constant" and isinstance(p.attrs.get("value"), gs.Constant):
        return p.attrs["value"]
    return None


def weight_dq(t: gs.Tensor, max_hops: int = 3) -> WeightDQ | None:
    """The quantized weight constant behind an op input, in trtkit's or ModelOpt's form, else None."""
    transposed = False
    p = _producer(t)
    hops = 0
    while p is not None and p.op in _LAYOUT_OPS and hops < max_hops:
        if p.op == "Transpose":
            transposed = not transposed
        p = _producer(p.inputs[0])
        hops += 1
    if p is None or p.op not in DQ_OPS:
        return None
    src = p.inputs[0]
    c = _constant(src)
    if c is None:  # ModelOpt: the float weight is quantized in the graph
        q = _producer(src)
        if q is None or q.op not in Q_OPS:
            return None
        c = _constant(q.inputs[0])
        if c is None:
            return None
    elif hops == 0:
        return None  # trtkit's own form with nothing between: the finders' own path handles it
    return WeightDQ(const=c, dq=p, transposed=transposed)


def is_modelopt_form(graph: gs.Graph) -> bool:
    """Does the graph quantize float weights in-graph (ModelOpt's export) rather than store them 8-bit?"""
    for n in graph.nodes:
        if n.op in Q_OPS and _constant(n.inputs[0]) is not None:
            return True
    return False


def to_native(model) -> int:  # type: ignore[no-untyped-def]
    """Make ModelOpt's FP8 Q/DQ plain ONNX in place (onnxruntime runs it; TensorRT parses both forms):
    its FP8 exporter renames `TRT_FP8QuantizeLinear` to `QuantizeLinear` but leaves the node in the
    `trt` domain and the uint8 type of the custom op on its output; a raw export keeps the custom op,
    whose FP8 type then comes from a zero point added here. Every per-tensor DequantizeLinear that reads
    FP8 gets that zero point too: onnxruntime's QDQ propagation (on at its default optimization level)
    copies a DQ's scale and zero point into the Q/DQ pair it inserts after a Transpose or Reshape, and a
    copy with no zero point quantizes to uint8, which zeroes every negative value (on the tiny SDXL
    UNet it took ModelOpt's FP8 graph from 0.126 to 0.443 error against FP32). Returns how many nodes
    changed."""
    import onnx
    from onnx import helper

    changed = 0
    zp_name = "trtkit_fp8_zero_point"
    need_zp = False
    stale: set[str] = set()
    for n in model.graph.node:
        if n.op_type in ("TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"):
            n.op_type = n.op_type.replace("TRT_FP8", "")
            n.domain = ""
            if n.op_type == "QuantizeLinear" and len(n.input) < 3:
                n.input.append(zp_name)
                need_zp = True
        elif n.domain == "trt" and n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            n.domain = ""
        else:
            continue
        changed += 1
        if n.op_type == "QuantizeLinear":
            stale.update(n.output)
    changed += _fp8_dq_zero_points(model, zp_name)
    used = need_zp or any(zp_name in n.input for n in model.graph.node if n.op_type == "DequantizeLinear")
    if used and all(i.name != zp_name for i in model.graph.initializer):
        model.graph.initializer.append(helper.make_tensor(zp_name, onnx.TensorProto.FLOAT8E4M3FN, (), [0.0]))
    keep = [v for v in model.graph.value_info if v.name not in stale]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    if changed:
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx") and o.version < 19:
                o.version = 19
    return changed


def _fp8_dq_zero_points(model, zp_name: str) -> int:  # type: ignore[no-untyped-def]
    """Give every per-tensor DequantizeLinear without a zero point that reads FP8 (a stored FP8 weight,
    or a QuantizeLinear with an FP8 zero point) the scalar FP8 zero point `zp_name`; returns how many."""
    import onnx

    fp8 = (onnx.TensorProto.FLOAT8E4M3FN,)
    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    prod = {o: n for n in model.graph.node for o in n.output}

    def tensor(name: str):  # type: ignore[no-untyped-def]
        return inits.get(name) or consts.get(name)

    def reads_fp8(dq: onnx.NodeProto) -> bool:
        t = tensor(dq.input[0])
        if t is not None:
            return t.data_type in fp8
        q = prod.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3:
            return False
        zp = tensor(q.input[2]) if q.input[2] != zp_name else None
        return q.input[2] == zp_name or (zp is not None and zp.data_type in fp8)

    n_added = 0
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
            continue
        scale = tensor(n.input[1])
        if scale is None or len(scale.dims) != 0 or not reads_fp8(n):
            continue  # a per-channel scale would need a zero point of its shape
        n.input.append(zp_name)
        n_added += 1
    return n_added
