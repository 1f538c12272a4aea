"""The graph rewriting of the Q/DQ pass: Q/DQ pairs on activations (one per tensor, shared by the ops
that read it), DequantizeLinear on 8-bit weight initializers, the attention BMMs' four inputs, and the
SmoothQuant vectors (folded into a LayerNorm or a Mul)."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from trtkit.errors import TrtkitError
from trtkit.graph import patterns
from trtkit.graph.choice import Decision, with_amax
from trtkit.graph.onnx_io import float_values
from trtkit.graph.patterns import AttentionMatch, WeightedMatch
from trtkit.graph.scales import act_scale, quantize_weight, typed_const


class Inserter:
    def __init__(self, graph: gs.Graph, precision: str, fp16: bool, spill: Any = None) -> None:
        self.g = graph
        self.spill = spill  # trtkit.graph.onnx_io.Spill: 8-bit weights go to the output's data file at once
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
            self._zp = typed_const(name, np.zeros((), np.int8 if self.precision == "int8" else np.uint8),
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

    def weight(self, node: gs.Node, q: np.ndarray, scale: np.ndarray, axis: int, prefix: str) -> None:
        """node's weight input <- DequantizeLinear(q, scale) (q, scale from scales.quantize_weight)."""
        shape = list(q.shape)
        wq = typed_const(self._unique(f"{prefix}/weight_quantized"), q, self.precision)
        del q
        if self.spill is not None:
            wq = gs.Constant(wq.name, LazyValues(self.spill.put(wq._values.tensor)))
        sc = gs.Constant(self._unique(f"{prefix}/weight_scale"), scale)
        zp = typed_const(self._unique(f"{prefix}/weight_zero_point"),
                          np.zeros(scale.shape, np.int8 if self.precision == "int8" else np.uint8), self.precision)
        dname = self._unique(f"{prefix}/weight_quantizer/DequantizeLinear")
        dout = gs.Variable(f"{dname}_output_0", dtype=np.float32, shape=shape)
        self.g.nodes.append(gs.Node("DequantizeLinear", dname, attrs={"axis": axis}, inputs=[wq, sc, zp],
                                    outputs=[dout]))
        node.inputs[1] = dout

    def mul(self, x: gs.Variable, vec: np.ndarray, prefix: str) -> gs.Variable:
        c = gs.Constant(self._unique(f"{prefix}/smooth_inv"), np.asarray(vec, np.float32))
        name = self._unique(f"{prefix}/smooth/Mul")
        out = gs.Variable(f"{name}_output_0", dtype=np.float32, shape=x.shape)
        self.g.nodes.append(gs.Node("Mul", name, inputs=[x, c], outputs=[out]))
        return out



def prefix(m: WeightedMatch | AttentionMatch) -> str:
    """Names of inserted nodes continue the op's own scope (`/unet/.../to_q/input_quantizer/QuantizeLinear`,
    as ModelOpt names them), so later passes and the builder's layer names still read as modules."""
    node = m.node if isinstance(m, WeightedMatch) else m.bmm1
    if "/" in node.strip("/"):
        return node.rsplit("/", 1)[0]
    return m.module


def fold_smooth_into_layernorm(x: gs.Variable, s: np.ndarray, base_dir: Path) -> bool:
    """x = LayerNorm(...) read only by the smoothed ops: divide gamma and beta by s instead of adding a Mul."""
    p = patterns.producer(x)
    if p is None or p.op != "LayerNormalization" or len(p.inputs) < 2:
        return False
    if not all(isinstance(t, gs.Constant) for t in p.inputs[1:3] if t is not None):
        return False
    gamma = float_values(p.inputs[1], base_dir)
    if gamma.shape != s.shape:
        return False
    p.inputs[1] = gs.Constant(f"{p.name}/gamma_smoothed", (gamma / s).astype(np.float32))
    if len(p.inputs) > 2 and p.inputs[2] is not None:
        p.inputs[2] = gs.Constant(f"{p.name}/beta_smoothed", (float_values(p.inputs[2], base_dir) / s).astype(np.float32))
    return True



def attention_core(nodes: dict[str, gs.Node], a: AttentionMatch) -> set[str]:
    """bmm1 .. softmax .. bmm2 and the pre-scale Muls: the FP32 island of an 8-bit attention."""
    keep = {a.bmm1, a.softmax, a.bmm2}
    keep |= {n for n in (a.q_prescale, a.k_prescale) if n}
    t = nodes[a.softmax].inputs[0]
    p = patterns.producer(t)
    while p is not None and p.name != a.bmm1 and p.op in ("Mul", "Div", "Add", "Cast", "Where"):
        keep.add(p.name)
        p = patterns.producer(p.inputs[0])
    return keep



def smooth_vector(m: WeightedMatch, nodes: dict[str, gs.Node], cal: Any) -> np.ndarray | None:
    """The calibration's SmoothQuant vector of a weighted op, checked against its weight's input channels."""
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


def quantize_job(job: tuple[gs.Constant, np.ndarray | None, int, int], base_dir: Path, precision: str,
                 fp16: bool) -> tuple[np.ndarray, np.ndarray]:
    """One weight read (from external data too), SmoothQuant-scaled along its input axis, and quantized."""
    const, s, axis, in_axis = job
    w = float_values(const, base_dir)
    if s is not None:
        shape = [1] * w.ndim
        shape[in_axis] = -1
        w = w * s.reshape(shape)
    return quantize_weight(w, axis, precision, fp16)


def quantized_weights(jobs: Sequence[tuple[gs.Constant, np.ndarray | None, int, int]], base_dir: Path,
                      precision: str, fp16: bool, workers: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """quantize_job of each job, in order, up to `workers` at a time in threads (numpy's reductions, division and
    casts and the file reads release the GIL: on a FLUX.1-size model this is most of the pass's time). At most
    `workers` weights are in flight, so the pass's peak memory grows by that many weights, not the model."""
    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield quantize_job(job, base_dir, precision, fp16)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="trtkit-quantize") as pool:
        todo = iter(jobs)
        pending: deque[Future[tuple[np.ndarray, np.ndarray]]] = deque(
            pool.submit(quantize_job, job, base_dir, precision, fp16) for job in islice(todo, workers))
        while pending:
            done = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(quantize_job, nxt, base_dir, precision, fp16))
            yield done


def insert_qdq(g: gs.Graph, w_q: Sequence[WeightedMatch], a_q: Sequence[AttentionMatch], amax: dict[str, float],
               source: dict[str, str], decisions: dict[str, Decision], cal: Any, precision: str, fp16: bool,
               base_dir: Path, spill: Any = None) -> int:
    """Rewire the graph in place; returns the number of activation Q/DQ pairs, and records the amax
    used in `decisions`. Its references to graph objects end with this call, so the graph can be freed
    after the export."""
    nodes = {n.name: n for n in g.nodes}
    tensors = g.tensors()
    ins = Inserter(g, precision, fp16, spill)
    # Weights first (SmoothQuant scales their input channels).
    groups: dict[tuple[str, bytes | None], list[WeightedMatch]] = {}
    smooth_of: dict[str, np.ndarray | None] = {}
    jobs = []
    for m in w_q:
        s = smooth_vector(m, nodes, cal)
        smooth_of[m.module] = s
        jobs.append((patterns._const_weight(nodes[m.node].inputs[1])[0], s, m.axis, m.in_axis))
    for m, (q, scale) in zip(w_q, quantized_weights(jobs, base_dir, precision, fp16), strict=True):
        ins.weight(nodes[m.node], q, scale, m.axis, prefix(m))
        del q
        s = smooth_of[m.module]
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
                                        and fold_smooth_into_layernorm(x, vec, base_dir)):
                src_t = ins.mul(x, (1.0 / vec).astype(np.float32), prefix(ms[0]))
            slots = [(nodes[m.node], 0) for m in ms]
            shared = max(amax[m.module] for m in ms)
            ins.activation(src_t, shared, prefix(ms[0]) + "/input_quantizer", slots)
            for m in ms:
                decisions[m.module] = with_amax(decisions[m.module], shared, source[m.module])
    for a in a_q:
        b1, b2 = nodes[a.bmm1], nodes[a.bmm2]
        p = prefix(a)
        ins.activation(tensors[a.q], amax[f"{a.module}.q_bmm"], f"{p}/q_bmm_quantizer", [(b1, 0)])
        ins.activation(tensors[a.k], amax[f"{a.module}.k_bmm"], f"{p}/k_bmm_quantizer", [(b1, 1)])
        ins.activation(tensors[a.v], amax[f"{a.module}.v_bmm"], f"{p}/v_bmm_quantizer", [(b2, 1)])
        ins.activation(tensors[a.probs], 1.0, f"{p}/softmax_quantizer", [(b2, 0)])
        decisions[a.module] = with_amax(decisions[a.module], amax[f"{a.module}.q_bmm"], source[f"{a.module}.q_bmm"])
    return ins.pairs
