"""Helpers of the inspector tests: the layer-information fixtures and a small Q/DQ ONNX whose node names are
those of the tiny UNet slice the layer fixtures describe (so the cross-check can be tested exactly)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"
U = "/unet"
B0 = f"{U}/down_blocks.0/resnets.0"
TB = f"{U}/down_blocks.1/attentions.0/transformer_blocks.0"


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text()


def make_qdq_onnx(path: Path, qtype: str = "int8", attention_fp8: bool = False) -> Path:
    """conv1/conv2 and ff in/out with Q/DQ pairs, attn1 q/k/v with pairs, attn1 to_out with a weight-only DQ
    (a missing pair), attn1/attn2 cores (Q/DQ on both batched matmuls when `attention_fp8`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    qt = TensorProto.INT8 if qtype == "int8" else TensorProto.FLOAT8E4M3FN
    nodes: list = []
    inits: list = []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def zp(name: str) -> str:
        inits.append(helper.make_tensor(name, qt, [], [0]))
        return name

    def act_qdq(prefix: str, x: str) -> str:
        s = const(f"{prefix}/input_quantizer/scale", np.array(0.05, np.float32))
        z = zp(f"{prefix}/input_quantizer/zero_point")
        nodes.append(helper.make_node("QuantizeLinear", [x, s, z], [f"{prefix}/input_quantizer/q"],
                                      name=f"{prefix}/input_quantizer/QuantizeLinear"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}/input_quantizer/q", s, z],
                                      [f"{prefix}/input_quantizer/dq"], name=f"{prefix}/input_quantizer/DequantizeLinear"))
        return f"{prefix}/input_quantizer/dq"

    def weight_dq(prefix: str, shape: tuple[int, ...], axis: int) -> str:
        w = helper.make_tensor(f"{prefix}/weight_q", qt, list(shape), np.zeros(int(np.prod(shape)), np.int32).tolist())
        inits.append(w)
        s = const(f"{prefix}/weight_quantizer/scale", np.full(shape[axis], 0.01, np.float32))
        nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}/weight_q", s], [f"{prefix}/weight_dq"],
                                      name=f"{prefix}/weight_quantizer/DequantizeLinear", axis=axis))
        return f"{prefix}/weight_dq"

    x = "sample"
    nodes.append(helper.make_node("Conv", [x, const("unet.conv_in.weight", np.zeros((32, 4, 3, 3), np.float32))],
                                  [f"{U}/conv_in/Conv_output_0"], name=f"{U}/conv_in/Conv", pads=[1, 1, 1, 1]))
    h = f"{U}/conv_in/Conv_output_0"
    for conv in ("conv1", "conv2"):
        p = f"{B0}/{conv}"
        nodes.append(helper.make_node("Conv", [act_qdq(p, h), weight_dq(p, (32, 32, 3, 3), 0)],
                                      [f"{p}/Conv_output_0"], name=f"{p}/Conv", pads=[1, 1, 1, 1]))
        h = f"{p}/Conv_output_0"
    t = "hidden_tokens"  # [2, 256, 64]
    proj = {}
    for name in ("to_q", "to_k", "to_v"):
        p = f"{TB}/attn1/{name}"
        nodes.append(helper.make_node("MatMul", [act_qdq(p, t), weight_dq(p, (64, 64), 1)], [f"{p}/MatMul_output_0"],
                                      name=f"{p}/MatMul"))
        proj[name] = f"{p}/MatMul_output_0"
    for a in ("attn1", "attn2"):
        p = f"{TB}/{a}"
        q = proj["to_q"] if a == "attn1" else "q2"
        k = proj["to_k"] if a == "attn1" else "k2"
        v = proj["to_v"] if a == "attn1" else "v2"
        nodes.append(helper.make_node("Mul", [q, const(f"{p}/scale_q", np.array(0.5, np.float32))], [f"{p}/Mul_output_0"],
                                      name=f"{p}/Mul"))
        nodes.append(helper.make_node("Mul", [k, const(f"{p}/scale_k", np.array(0.5, np.float32))],
                                      [f"{p}/Mul_1_output_0"], name=f"{p}/Mul_1"))
        qq, kk = f"{p}/Mul_output_0", f"{p}/Mul_1_output_0"
        if attention_fp8 and a == "attn1":
            qq, kk = act_qdq(f"{p}/q_bmm", qq), act_qdq(f"{p}/k_bmm", kk)
        nodes.append(helper.make_node("MatMul", [qq, kk], [f"{p}/MatMul_output_0"], name=f"{p}/MatMul"))
        nodes.append(helper.make_node("Softmax", [f"{p}/MatMul_output_0"], [f"{p}/Softmax_output_0"], name=f"{p}/Softmax"))
        pr, vv = f"{p}/Softmax_output_0", v
        if attention_fp8 and a == "attn1":
            pr, vv = act_qdq(f"{p}/softmax", pr), act_qdq(f"{p}/v_bmm", vv)
        nodes.append(helper.make_node("MatMul", [pr, vv], [f"{p}/MatMul_1_output_0"], name=f"{p}/MatMul_1"))
    p = f"{TB}/attn1/to_out.0"
    nodes.append(helper.make_node("MatMul", [f"{TB}/attn1/MatMul_1_output_0", weight_dq(p, (64, 64), 1)],
                                  [f"{p}/MatMul_output_0"], name=f"{p}/MatMul"))
    p = f"{TB}/ff/net.0/proj"
    nodes.append(helper.make_node("MatMul", [act_qdq(p, f"{TB}/attn1/to_out.0/MatMul_output_0"),
                                             weight_dq(p, (64, 512), 1)], [f"{p}/MatMul_output_0"], name=f"{p}/MatMul"))
    p = f"{TB}/ff/net.2"
    nodes.append(helper.make_node("MatMul", [act_qdq(p, "ff_hidden"), weight_dq(p, (256, 64), 1)],
                                  [f"{p}/MatMul_output_0"], name=f"{p}/MatMul"))
    nodes.append(helper.make_node("Conv", [h, const("unet.conv_out.weight", np.zeros((4, 32, 3, 3), np.float32))],
                                  ["noise_pred"], name=f"{U}/conv_out/Conv", pads=[1, 1, 1, 1]))
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f32, None) for n in
              ("sample", "hidden_tokens", "q2", "k2", "v2", "ff_hidden")]
    graph = helper.make_graph(nodes, "tiny_unet_slice", inputs,
                              [helper.make_tensor_value_info("noise_pred", f32, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    helper.set_model_props(model, {"trtkit.scope": "/unet/"})
    onnx.save(model, str(path))
    return path


def write_engine(dirpath: Path, plan_bytes: bytes, layers: str | None, meta: dict | None,
                 name: str = "unet") -> Path:
    """x.plan (+ x.layers.json, x.json) the way `trtkit build` lays them out."""
    dirpath.mkdir(parents=True, exist_ok=True)
    plan = dirpath / f"{name}.plan"
    plan.write_bytes(plan_bytes)
    if layers is not None:
        (dirpath / f"{name}.layers.json").write_text(layers)
    if meta is not None:
        (dirpath / f"{name}.json").write_text(json.dumps(meta))
    return plan
