"""Where ModelOpt's FP8 graph loses accuracy: onnxruntime error against FP32 of the cross-check's ONNX
files (benchmarks/crosscheck_modelopt.py --case tiny) with groups of Q/DQ pairs bypassed, and with
FP16 instead of FP8 conv weights (ModelOpt's exporter stores every conv weight in FP8, per tensor).

    python3 benchmarks/crosscheck_fp8_bypass.py /tmp/xcheck/tiny
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from trtkit.exporter import run_onnxruntime
from trtkit.graph.modelopt_form import to_native

d = sys.argv[1].rstrip("/") + "/"
fp32 = d + "unet.fp32.onnx"
m32 = onnx.load(fp32)
shapes = {i.name: [x.dim_value for x in i.type.tensor_type.shape.dim] for i in m32.graph.input}
rng = np.random.default_rng(1)
feeds = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
feeds["timestep"] = np.array([500.0], np.float32)
if "time_ids" in feeds:
    feeds["time_ids"] = np.tile(np.array([256, 256, 0, 0, 256, 256], np.float32), (shapes["time_ids"][0], 1))
ref = run_onnxruntime(fp32, feeds)[0]
half = {k: v.astype(np.float16) for k, v in feeds.items()}
Pred = Callable[[onnx.NodeProto, dict], bool]


def err(m: onnx.ModelProto, tag: str) -> None:
    onnx.save(m, d + "bypass.onnx")
    o = run_onnxruntime(d + "bypass.onnx", half)[0].astype(np.float32)
    print(f"{tag}: {float(np.abs(o - ref).max() / np.abs(ref).max()):.4f}", flush=True)


def bypass(m: onnx.ModelProto, pred: Pred) -> int:
    """Readers of a matching activation DQ read the Q's input instead."""
    prod = {o: n for n in m.graph.node for o in n.output}
    cons: dict[str, list] = {}
    for n in m.graph.node:
        for i, x in enumerate(n.input):
            cons.setdefault(x, []).append((n, i))
    c = 0
    for n in m.graph.node:
        q = prod.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and pred(n, cons):
            for cn, i in cons.get(n.output[0], []):
                cn.input[i] = q.input[0]
                c += 1
    return c


def modelopt() -> onnx.ModelProto:
    m = onnx.load(d + "modelopt.fp8.onnx")
    to_native(m)
    return m


def reads(op: str) -> Pred:
    return lambda n, cons: any(cn.op_type == op for cn, _ in cons.get(n.output[0], []))


def named(part: str) -> Pred:
    return lambda n, cons: any(part in cn.name for cn, _ in cons.get(n.output[0], []))


ln, po, attn = reads("LayerNormalization"), named("proj_out"), reads("Cast")  # its MHA: DQ -> Cast -> BMM
err(modelopt(), "ModelOpt FP8 as exported")
err(onnx.load(d + "trtkit.fp8.onnx"), "trtkit FP8")
for tag, pred in (("ModelOpt without LayerNorm-input Q/DQ", ln), ("ModelOpt without proj_out-input Q/DQ", po),
                  ("ModelOpt without LayerNorm and proj_out Q/DQ", lambda n, c: ln(n, c) or po(n, c)),
                  ("ModelOpt without those and its attention Q/DQ", lambda n, c: ln(n, c) or po(n, c) or attn(n, c)),
                  ("ModelOpt without any activation Q/DQ (weights only)", lambda n, c: True)):
    m = modelopt()
    bypass(m, pred)
    err(m, tag)
w32 = {i.name: numpy_helper.to_array(i) for i in m32.graph.initializer}
conv_w = {n.name: n.input[1] for n in m32.graph.node if n.op_type == "Conv"}
EXCLUDED_CONVS = ("conv_in", "conv_out", "conv_shortcut")  # activation not quantized by either side
for tag, which in (("ModelOpt with FP16 weights on every conv", lambda name: True),
                   ("ModelOpt with FP16 weights on conv_in/conv_out/conv_shortcut (as trtkit)",
                    lambda name: any(p in name for p in EXCLUDED_CONVS))):
    m = modelopt()
    for n in m.graph.node:
        if n.op_type == "Conv" and conv_w.get(n.name) in w32 and which(n.name):
            m.graph.initializer.append(numpy_helper.from_array(w32[conv_w[n.name]].astype(np.float16),
                                                               n.name + "_w16"))
            n.input[1] = n.name + "_w16"
    err(m, tag)
