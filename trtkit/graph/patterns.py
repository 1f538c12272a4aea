"""Pattern finders on exported diffusers graphs: linear, conv and multi-head attention, each named
after the diffusers module it came from.

Names come from the node-name scope the TorchScript exporter writes
(`/unet/down_blocks.1/attentions.0/transformer_blocks.0/attn1/to_q/MatMul` ->
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`), because bias-free Linear weights are
anonymous initializers (`onnx::MatMul_3773`). Graphs without scopes fall back to initializer names
(`unet.conv_in.weight` -> `conv_in`), and failing that to the node name itself.

The finders accept graphs that already carry Q/DQ (a weight behind DequantizeLinear, an activation
coming out of DequantizeLinear), so coverage reports read quantized files with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from trtkit.graph import modelopt_form
from trtkit.graph.module_names import block_of as block_of  # re-exported: its old home
from trtkit.graph.module_names import module_from_initializer, module_from_node

WEIGHTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


@dataclass(frozen=True)
class WeightedMatch:
    """A Linear (MatMul/Gemm) or Conv(Transpose) with a constant weight."""

    kind: str  # "linear" | "conv"
    module: str  # diffusers module name
    node: str  # node name in the graph
    op: str  # MatMul | Gemm | Conv | ConvTranspose
    input: str  # activation tensor name (after any DequantizeLinear: the float tensor the op reads)
    weight: str  # weight initializer name (the quantized one when already quantized)
    axis: int  # per-output-channel axis of the weight
    in_axis: int  # input-channel axis of the weight (SmoothQuant scales it)
    bias: str | None = None  # the bias Add node following a MatMul, if any
    weight_type: str | None = None  # "int8"/"fp8" when the weight is already behind DequantizeLinear
    input_type: str | None = None  # "int8"/"fp8" when the activation comes out of DequantizeLinear


@dataclass(frozen=True)
class AttentionMatch:
    """Q·Kᵀ MatMul -> (scale) -> Softmax -> ·V MatMul."""

    module: str  # ...attn1
    bmm1: str
    softmax: str
    bmm2: str
    q: str  # tensor names read by the two batched matmuls
    k: str
    v: str
    probs: str  # softmax output (the activation input of bmm2)
    head_size: int | None
    q_prescale: str | None = None  # Mul nodes applying the attention scale before bmm1 (SDPA export)
    k_prescale: str | None = None
    quantized: dict[str, str] = field(default_factory=dict)  # role -> "int8"/"fp8" where DQ feeds it


@dataclass
class Matches:
    linear: list[WeightedMatch]
    conv: list[WeightedMatch]
    attention: list[AttentionMatch]
    scoped: bool  # module names came from node scopes (True) or from fallbacks (False)
    notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.linear or self.conv or self.attention)

    def modules(self) -> set[str]:
        return {m.module for m in self.linear} | {m.module for m in self.conv} | {a.module for a in self.attention}

    def summary(self) -> str:
        return f"{len(self.linear)} linear, {len(self.conv)} conv, {len(self.attention)} attention"


# --------------------------------------------------------------------------- graph helpers

def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if isinstance(t, gs.Variable) and t.inputs else None


def _qtype_of_dq(dq: gs.Node) -> str | None:
    """The 8-bit type a DequantizeLinear reads: from its zero point or its input's dtype."""
    if dq.op.startswith("TRT_FP8"):  # ModelOpt's FP8 custom op (uint8 on the wire)
        return "fp8"
    cands = [dq.inputs[2]] if len(dq.inputs) > 2 and dq.inputs[2] is not None else []
    q = producer(dq.inputs[0])
    if q is not None and q.op == "QuantizeLinear" and len(q.inputs) > 2:
        # before the wire dtype: ModelOpt's FP8 exporter leaves a stale uint8 value_info there
        cands.append(q.inputs[2])
    cands.append(dq.inputs[0])
    for t in cands:
        name = _dtype_name(t)
        if name:
            return name
    return None


def _dtype_name(t: gs.Tensor) -> str | None:
    import onnx

    dt = None
    if isinstance(t, gs.Constant):
        from onnx_graphsurgeon.ir.tensor import LazyValues

        if isinstance(t._values, LazyValues):
            dt = t._values.tensor.data_type
            return {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "int8",
                    onnx.TensorProto.FLOAT8E4M3FN: "fp8"}.get(dt)
        dt = t.values.dtype
    else:
        dt = t.dtype
    if dt is None:
        return None
    if dt in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
        return "int8"
    if dt == onnx.TensorProto.FLOAT8E4M3FN:
        return "fp8"
    try:
        npdt = np.dtype(dt)
    except TypeError:
        return None
    if npdt in (np.int8, np.uint8):
        return "int8"
    if "float8_e4m3" in str(npdt):
        return "fp8"
    return None


def _const_weight(t: gs.Tensor) -> tuple[gs.Constant | None, str | None]:
    """The constant behind an op's weight input: directly, or behind a DequantizeLinear / Cast."""
    if isinstance(t, gs.Constant):
        return t, None
    p = producer(t)
    if p is None:
        return None, None
    if p.op == "DequantizeLinear" and isinstance(p.inputs[0], gs.Constant):
        return p.inputs[0], _qtype_of_dq(p)
    if p.op == "Cast" and isinstance(p.inputs[0], gs.Constant):
        return p.inputs[0], None
    if p.op == "Constant" and "value" in p.attrs:  # not folded by the exporter
        return p.outputs[0] if isinstance(p.outputs[0], gs.Constant) else None, None
    hit = modelopt_form.weight_dq(t)  # ModelOpt's export: float weight -> Q -> DQ [-> Transpose]
    if hit is not None:
        return hit.const, _qtype_of_dq(hit.dq)
    return None, None


def _activation(t: gs.Tensor) -> tuple[str, str | None]:
    """(tensor name, 8-bit type) of an op's activation input, looking through a Q -> DQ pair."""
    p = producer(t)
    if p is not None and p.op == "Cast":  # ModelOpt's FP8 MHA: DQ -> Cast(FP32) -> BMM
        before = producer(p.inputs[0])
        p = before if before is not None and before.op in modelopt_form.DQ_OPS else p
    if p is not None and p.op in modelopt_form.DQ_OPS and not isinstance(p.inputs[0], gs.Constant):
        return t.name, _qtype_of_dq(p)
    return t.name, None


def _shape_last(t: gs.Tensor) -> int | None:
    shape = getattr(t, "shape", None)
    if shape and isinstance(shape[-1], (int, np.integer)) and shape[-1] > 0:
        return int(shape[-1])
    return None


# --------------------------------------------------------------------------- finders

class _Namer:
    def __init__(self, scope: str | None) -> None:
        self.scope = scope
        self.from_scope = 0
        self.fallback = 0

    def __call__(self, node: gs.Node, weight: gs.Tensor | None = None) -> str:
        name = module_from_node(node.name or "", self.scope)
        if name:
            self.from_scope += 1
            return name
        self.fallback += 1
        if weight is not None:
            w_name = module_from_initializer(weight.name)
            if w_name:
                return w_name
        return node.name or f"<unnamed {node.op}>"


def find(graph: gs.Graph, scope: str | None = None) -> Matches:
    """All linear, conv and attention matches of a graph (unquantized or already Q/DQ'd)."""
    namer = _Namer(scope)
    linear: list[WeightedMatch] = []
    conv: list[WeightedMatch] = []
    attention: list[AttentionMatch] = []
    for node in graph.nodes:
        if node.op in WEIGHTED_OPS and len(node.inputs) >= 2:
            m = _weighted(node, namer)
            if m is not None:
                (linear if m.kind == "linear" else conv).append(m)
        elif node.op == "Softmax":
            a = _attention(node, namer)
            if a is not None:
                attention.append(a)
    # Two matches with one module name (unusual graphs): keep names unique so decisions stay addressable.
    for lst in (linear, conv):
        seen: dict[str, int] = {}
        for i, m in enumerate(lst):
            if m.module in seen:
                seen[m.module] += 1
                lst[i] = _renamed(m, f"{m.module}#{seen[m.module]}")
            else:
                seen[m.module] = 0
    notes = []
    if namer.fallback and not namer.from_scope:
        notes.append("node names carry no module scope; names come from initializers or node names")
    return Matches(linear, conv, attention, scoped=namer.from_scope > 0 and not namer.fallback, notes=notes)


def _renamed(m: WeightedMatch, module: str) -> WeightedMatch:
    from dataclasses import replace

    return replace(m, module=module)


def _weighted(node: gs.Node, namer: _Namer) -> WeightedMatch | None:
    w, wtype = _const_weight(node.inputs[1])
    if w is None:
        return None
    act, atype = _activation(node.inputs[0])
    rank = len(w.shape)
    if node.op == "MatMul":
        if rank != 2:
            return None
        axis, in_axis, kind = 1, 0, "linear"
    elif node.op == "Gemm":
        if rank != 2 or node.attrs.get("transA", 0):
            return None
        tb = int(node.attrs.get("transB", 0))
        axis, in_axis, kind = (0, 1, "linear") if tb else (1, 0, "linear")
    elif node.op == "Conv":
        if rank < 3:
            return None
        axis, in_axis, kind = 0, 1, "conv"
    else:  # ConvTranspose: weight [C_in, C_out/group, k...]
        if rank < 3 or int(node.attrs.get("group", 1)) != 1:
            return None
        axis, in_axis, kind = 1, 0, "conv"
    bias = None
    if node.op == "MatMul":
        outs = node.outputs[0].outputs
        if len(outs) == 1 and outs[0].op == "Add":
            other = [t for t in outs[0].inputs if t is not node.outputs[0]]
            if other and isinstance(other[0], gs.Constant) and len(other[0].shape) == 1:
                bias = outs[0].name
    return WeightedMatch(kind=kind, module=namer(node, w), node=node.name, op=node.op, input=act,
                         weight=w.name, axis=axis, in_axis=in_axis, bias=bias, weight_type=wtype, input_type=atype)


def _through(t: gs.Tensor, ops: tuple[str, ...]) -> tuple[gs.Tensor, list[gs.Node]]:
    """Walk up from t through single-input-path ops (Q/DQ pairs, casts); return the first tensor
    before them and the walked nodes."""
    walked = []
    p = producer(t)
    while p is not None and p.op in ops:
        walked.append(p)
        t = p.inputs[0]
        p = producer(t)
    return t, walked


def _attention(softmax: gs.Node, namer: _Namer) -> AttentionMatch | None:
    # bmm1 -> [Mul/Div/Add (scale, mask)] -> [Cast] -> Softmax
    t = softmax.inputs[0]
    bmm1 = producer(t)
    hops = 0
    while bmm1 is not None and bmm1.op in ("Mul", "Div", "Add", "Cast", "Where") and hops < 4:
        bmm1 = producer(bmm1.inputs[0])
        hops += 1
    if bmm1 is None or bmm1.op != "MatMul":
        return None
    # Softmax -> [Cast] -> [Q -> DQ] -> bmm2 (as its first input)
    probs = softmax.outputs[0]
    bmm2 = None
    frontier = [probs]
    for _ in range(4):
        nxt = []
        for x in frontier:
            for c in x.outputs:
                if c.op == "MatMul" and c.inputs[0] is x:
                    bmm2 = c
                elif c.op in ("Cast", *modelopt_form.Q_OPS, *modelopt_form.DQ_OPS):
                    nxt.append(c.outputs[0])
        if bmm2 is not None or not nxt:
            break
        frontier = nxt
    if bmm2 is None:
        return None
    if any(isinstance(x, gs.Constant) or _const_weight(x)[0] is not None for x in (*bmm1.inputs, bmm2.inputs[1])):
        return None  # a weight, not a batched matmul
    quantized: dict[str, str] = {}
    for role, x in (("q", bmm1.inputs[0]), ("k", bmm1.inputs[1]), ("v", bmm2.inputs[1]), ("softmax", bmm2.inputs[0])):
        _, qt = _activation(x)
        if qt:
            quantized[role] = qt
    # The logical q/k tensors (before any inserted Q/DQ) and the scale Muls of the SDPA export.
    qdq = (*modelopt_form.DQ_OPS, *modelopt_form.Q_OPS, "Cast")
    q_t, _ = _through(bmm1.inputs[0], qdq)
    k_t, _ = _through(bmm1.inputs[1], qdq)
    v_t, _ = _through(bmm2.inputs[1], qdq)
    p_t, _ = _through(bmm2.inputs[0], qdq)
    q_mul = producer(q_t)
    k_mul = producer(k_t)
    head = _shape_last(q_t) or _head_from_reshape(q_t)
    name = module_from_node(bmm1.name or "", namer.scope)
    if name:
        namer.from_scope += 1
    else:
        namer.fallback += 1
        name = bmm1.name or f"<attention at {softmax.name}>"
    return AttentionMatch(module=name, bmm1=bmm1.name, softmax=softmax.name, bmm2=bmm2.name, q=q_t.name, k=k_t.name,
                          v=v_t.name, probs=p_t.name, head_size=head,
                          q_prescale=q_mul.name if q_mul is not None and q_mul.op == "Mul" else None,
                          k_prescale=k_mul.name if k_mul is not None and k_mul.op == "Mul" else None,
                          quantized=quantized)


def scope_of(model_meta: dict[str, str]) -> str | None:
    return model_meta.get("trtkit.scope") or None


def _const_ints(t: gs.Tensor) -> list[int] | None:
    if isinstance(t, gs.Constant):
        return [int(x) for x in np.asarray(t.values).reshape(-1)]
    p = producer(t)
    if p is not None and p.op == "Constant" and isinstance(p.attrs.get("value"), gs.Constant):
        return [int(x) for x in np.asarray(p.attrs["value"].values).reshape(-1)]
    return None


def _head_from_reshape(t: gs.Tensor) -> int | None:
    """Head size where shape inference left it symbolic: the head split is Reshape([B, S, C] ->
    [B, -1, heads, C/heads]) with `heads` a constant in the target shape's Concat."""
    p = producer(t)
    for _ in range(4):
        if p is None:
            return None
        if p.op == "Reshape":
            break
        p = producer(p.inputs[0])
    if p is None or p.op != "Reshape":
        return None
    c = _shape_last(p.inputs[0])
    target = _const_ints(p.inputs[1])
    if target is not None and target[-1] > 0:
        return target[-1]
    cat = producer(p.inputs[1])
    if c is None or cat is None or cat.op != "Concat":
        return None
    heads = [v for x in cat.inputs for v in (_const_ints(x) or []) if v > 0]
    if len(heads) == 1 and c % heads[0] == 0:
        return c // heads[0]
    return None


class quiet_gs:
    """graphsurgeon logs warnings (missing `colored`, FP8 numpy types) that say nothing to users."""

    def __enter__(self) -> None:
        from onnx_graphsurgeon.logger import G_LOGGER

        self._old = G_LOGGER.severity
        G_LOGGER.severity = G_LOGGER.ERROR

    def __exit__(self, *exc: object) -> None:
        from onnx_graphsurgeon.logger import G_LOGGER

        G_LOGGER.severity = self._old
