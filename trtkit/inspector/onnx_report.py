"""The ONNX side of `trtkit inspect`: which nodes carry Q/DQ (so should run in 8-bit), per node.

The per-module Q/DQ coverage (per kind and per UNet block, and why the rest are not quantized) is the
graph room's `trtkit.graph.coverage`; this module adds the per-NODE view the engine cross-check needs,
because TensorRT's layer metadata names ONNX nodes, not diffusers modules. Written on the `onnx`
protobuf (not graphsurgeon): it only reads names and edges, and must stay fast on an SD-size graph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtkit._files import load_onnx
from trtkit.inspector.rows import JsonRow

WEIGHTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
# onnx.TensorProto data types of the quantized side of a Q/DQ pair.
_QTYPES = {3: "int8", 2: "uint8", 17: "fp8", 18: "fp8", 19: "fp8", 20: "fp8", 22: "int4", 23: "fp4"}
# an attention core's nodes as the exporter names them (torch's SDPA decomposed, or bmm in older exports)
ATTENTION_NODE = re.compile(r"^(?P<module>.*/attn\d*)/(?P<op>MatMul|MatMul_1|Softmax|bmm\d*)$")


@dataclass(frozen=True)
class QNode(JsonRow):
    """A linear, conv or attention-matmul node and whether Q/DQ feeds it."""

    node: str
    op: str
    kind: str  # "linear" | "conv" | "attention"
    module: str
    block: str
    qtype: str | None  # "int8" / "fp8" where a DequantizeLinear feeds it, else None
    act_q: bool  # the activation (first) input comes out of a DequantizeLinear
    weight_q: bool  # the weight (second) input comes out of a DequantizeLinear
    feeders: tuple[str, ...] = ()  # the DequantizeLinear nodes feeding it

    @property
    def quantized(self) -> bool:
        return self.qtype is not None


@dataclass(frozen=True)
class AttentionCore(JsonRow):
    """Q·Kᵀ MatMul, Softmax, ·V MatMul of one attention module, by node name."""

    module: str
    block: str
    bmm1: str | None
    softmax: str
    bmm2: str | None

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(n for n in (self.bmm1, self.softmax, self.bmm2) if n)


@dataclass
class OnnxScan:
    path: Path
    scope: str
    nodes: list[QNode]
    attention: list[AttentionCore]
    op_of: dict[str, str] = field(default_factory=dict)  # node name -> op type

    @property
    def quantized(self) -> list[QNode]:
        return [n for n in self.nodes if n.quantized]

    def summary(self) -> dict[str, dict[str, int]]:
        """{kind: {"total": n, "int8": n, "fp8": n, "weight-only": n, ...}}: both inputs behind Q/DQ counts as
        quantized in that type; one side only (no 8-bit kernel possible) is counted apart."""
        out: dict[str, dict[str, int]] = {}
        for n in self.nodes:
            d = out.setdefault(n.kind, {"total": 0})
            d["total"] += 1
            if n.qtype:
                key = n.qtype if (n.act_q and n.weight_q) else ("weight-only" if n.weight_q else "activation-only")
                d[key] = d.get(key, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "scope": self.scope, "summary": self.summary(),
                "nodes": [n.to_json() for n in self.nodes], "attention": [a.to_json() for a in self.attention]}


def module_of(node: str, scope: str) -> str:
    """'/unet/down_blocks.1/attentions.0/proj_in/MatMul' -> 'down_blocks.1.attentions.0.proj_in'."""
    name = node[len(scope):] if scope and node.startswith(scope) else node.lstrip("/")
    parts = [p for p in name.split("/") if p]
    return ".".join(parts[:-1]) if len(parts) > 1 else (parts[0] if parts else node)


def block_of(module: str) -> str:
    """The UNet block a module sits in: 'down_blocks.1', 'mid_block', 'up_blocks.0', 'conv_in', ..."""
    parts = module.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0] if parts and parts[0] else "(other)"


def node_block(node: str, scope: str = "/unet/") -> str:
    return block_of(module_of(node, scope))


def scan_onnx(path: str | Path) -> OnnxScan:
    """Every linear, conv and attention matmul with the Q/DQ that feeds it."""
    path = Path(path)
    model = load_onnx(path)
    graph = model.graph
    meta = {p.key: p.value for p in model.metadata_props}
    scope = meta.get("trtkit.scope", "/unet/")
    producer: dict[str, Any] = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
    init_type = {t.name: t.data_type for t in graph.initializer}
    op_of = {n.name: n.op_type for n in graph.node}

    def q_of_dq(dq: Any) -> str | None:
        src = dq.input[0]
        if src in init_type:  # a weight stored already quantized
            return _QTYPES.get(init_type[src])
        q = producer.get(src)
        if q is not None and q.op_type == "QuantizeLinear":
            for a in q.attribute:
                if a.name == "output_dtype" and a.i:
                    return _QTYPES.get(a.i)
            if len(q.input) > 2 and q.input[2] in init_type:
                return _QTYPES.get(init_type[q.input[2]])
            if len(q.input) > 2 and q.input[2] in producer:  # zero point from a Constant node
                zp = producer[q.input[2]]
                for a in zp.attribute:
                    if a.name == "value":
                        return _QTYPES.get(a.t.data_type)
            return "uint8"  # ONNX default zero point type
        return None

    def dq_feeding(tensor: str) -> tuple[Any | None, str | None]:
        # Look through layout-only ops between a DQ and its consumer (weights are often DQ -> Transpose).
        node = producer.get(tensor)
        for _ in range(3):
            if node is None:
                return None, None
            if node.op_type == "DequantizeLinear":
                return node, q_of_dq(node)
            if node.op_type not in ("Transpose", "Reshape", "Cast", "Identity", "Mul"):
                return None, None
            node = producer.get(node.input[0]) if node.input else None
        return None, None

    nodes: list[QNode] = []
    attention: list[AttentionCore] = []
    attn_mm: dict[str, dict[str, str]] = {}
    for node in graph.node:
        m = ATTENTION_NODE.match(node.name)
        if m and node.op_type in ("MatMul", "Softmax"):
            role = "softmax" if node.op_type == "Softmax" else (
                "bmm2" if node.name.endswith("_1") or node.name.endswith("bmm2") else "bmm1")
            attn_mm.setdefault(m.group("module"), {})[role] = node.name
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        a_dq, a_t = dq_feeding(node.input[0])
        w_dq, w_t = dq_feeding(node.input[1])
        is_attn = bool(m)
        w_const = node.input[1] in init_type or (w_dq is not None and w_dq.input[0] in init_type)
        if not is_attn and not w_const and producer.get(node.input[1]) is not None and w_dq is None:
            # neither constant weight nor attention: a data-data matmul we do not report (e.g. position math)
            src = producer[node.input[1]]
            if src.op_type not in ("Transpose", "Constant", "Reshape"):
                continue
        kind = "attention" if is_attn else ("conv" if node.op_type.startswith("Conv") else "linear")
        module = module_of(node.name, scope)
        if m is not None:
            module = module_of(m.group("module") + "/x", scope)
        feeders = tuple(d.name for d in (a_dq, w_dq) if d is not None)
        nodes.append(QNode(node=node.name, op=node.op_type, kind=kind, module=module, block=block_of(module),
                           qtype=a_t or w_t, act_q=a_dq is not None, weight_q=w_dq is not None, feeders=feeders))
    for mod_path, roles in attn_mm.items():
        if "softmax" not in roles:
            continue
        module = module_of(mod_path + "/x", scope)
        attention.append(AttentionCore(module=module, block=block_of(module), bmm1=roles.get("bmm1"),
                                       softmax=roles["softmax"], bmm2=roles.get("bmm2")))
    return OnnxScan(path=path, scope=scope, nodes=nodes, attention=attention, op_of=op_of)


def coverage_report(path: str | Path) -> Any | None:
    """The graph room's CoverageReport for this ONNX, or None where that module is not there yet."""
    try:
        from trtkit.graph.coverage import coverage
    except ImportError:
        return None
    return coverage(Path(path))


def coverage_json(report: Any) -> Any:
    if report is None:
        return None
    to_json = getattr(report, "to_json", None)
    if callable(to_json):
        return to_json()
    import dataclasses

    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        return dataclasses.asdict(report)
    return str(report)


@dataclass
class OnnxReport:
    scan: OnnxScan
    coverage: Any | None  # trtkit.graph.coverage.CoverageReport

    def to_json(self) -> dict[str, Any]:
        return {"kind": "onnx", "path": str(self.scan.path), "coverage": coverage_json(self.coverage),
                "nodes": self.scan.to_json()}


def onnx_report(path: str | Path) -> OnnxReport:
    scan = scan_onnx(path)
    return OnnxReport(scan=scan, coverage=coverage_report(path))


def _symbolic_shape_inference() -> Any:
    """onnxruntime's SymbolicShapeInference, loaded from its file: the `onnxruntime.tools` package __init__
    imports torch (2 s), which inspect must not pay for."""
    import importlib.util
    import sys

    name = "_trtkit_symbolic_shape_infer"
    if name not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("onnxruntime is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / "tools" / "symbolic_shape_infer.py"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise ImportError(f"no {path}")
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name].SymbolicShapeInference


def node_flops(path: str | Path, input_shapes: dict[str, list[int]] | None = None) -> dict[str, float]:
    """2 x multiply-adds of every MatMul, Gemm and Conv node at the given input shapes (the profile's opt
    shapes), for layers whose own dimensions give no estimate (Myelin regions). Empty when shapes do not
    resolve. Uses onnxruntime's symbolic shape inference where installed (it resolves the exporter's
    computed reshapes), else ONNX's own shape inference with data propagation (partial)."""
    import onnx

    model = load_onnx(Path(path))
    for inp in model.graph.input:
        shape = (input_shapes or {}).get(inp.name)
        dims = inp.type.tensor_type.shape.dim
        if shape is not None and len(shape) == len(dims):
            for d, v in zip(dims, shape, strict=True):
                d.Clear()
                d.dim_value = int(v)
    try:
        inferred = _symbolic_shape_inference().infer_shapes(model, auto_merge=True)
    except Exception:  # not installed, or an op it does not know: fall back to ONNX's inference
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:
            return {}
    if inferred is None:
        return {}
    shapes: dict[str, list[int | None]] = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    for t in inferred.graph.initializer:
        shapes[t.name] = list(t.dims)
    out: dict[str, float] = {}
    for node in inferred.graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        y, a, w = shapes.get(node.output[0]), shapes.get(node.input[0]), shapes.get(node.input[1])
        if not y or not a or None in y or None in a:
            continue
        n_out = 1
        for d in y:
            n_out *= int(d or 0)
        if node.op_type.startswith("Conv"):
            if not w or None in w or len(w) < 3:
                continue
            k = 1
            for d in w[2:]:
                k *= int(d or 0)
            groups = next((at.i for at in node.attribute if at.name == "group"), 1) or 1
            cin = a[1] or 0
            out[node.name] = 2.0 * n_out * (cin / groups) * k
        else:
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            kdim = a[0] if (node.op_type == "Gemm" and trans_a) else a[-1]
            out[node.name] = 2.0 * n_out * int(kdim or 0)
    return out
