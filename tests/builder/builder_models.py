"""ONNX models made in code for the builder tests (a unique module name: every room has a conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make_linear(path: Path, qdq: str | None = None, hidden: int = 64, external: bool = False,
                extra_node: onnx.NodeProto | None = None) -> Path:
    """x[B, hidden] -> (Q/DQ) -> MatMul(W) -> Relu -> y. With `qdq` ("int8"/"fp8"): activation Q/DQ per tensor
    and a per-channel quantized weight, the explicit-quantization pattern TensorRT fuses."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    nodes, inits = [], []
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hidden])
    act = "x"
    if qdq is None:
        inits.append(numpy_helper.from_array(w, "W"))
        weight = "W"
    else:
        qtype = {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}[qdq]
        qmax = {"int8": 127.0, "fp8": 448.0}[qdq]
        w_scale = (np.abs(w).max(axis=0) / qmax).astype(np.float32)  # per output channel (axis 1 of [in, out])
        wq = w / w_scale
        if qdq == "int8":
            w_t = numpy_helper.from_array(np.clip(np.round(wq), -128, 127).astype(np.int8), "Wq")
        else:
            w_t = helper.make_tensor("Wq", qtype, w.shape, wq.flatten().tolist())
        inits += [w_t, numpy_helper.from_array(w_scale, "w_scale"),
                  numpy_helper.from_array(np.float32(4.0 / qmax), "x_scale"),
                  helper.make_tensor("x_zp", qtype, [], [0]),
                  helper.make_tensor("w_zp", qtype, [hidden], [0] * hidden)]
        nodes += [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="/fc/input_quantizer/Q"),
                  helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"], name="/fc/input_quantizer/DQ"),
                  helper.make_node("DequantizeLinear", ["Wq", "w_scale", "w_zp"], ["Wdq"], name="/fc/weight_quantizer/DQ",
                                   axis=1)]
        act, weight = "xdq", "Wdq"
    nodes += [helper.make_node("MatMul", [act, weight], ["h"], name="/fc/MatMul"),
              helper.make_node("Relu", ["h"], ["y" if extra_node is None else "r"], name="/act/Relu")]
    if extra_node is not None:
        nodes.append(extra_node)
    graph = helper.make_graph(nodes, "linear", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)] +
                              ([helper.make_opsetid("custom.domain", 1)] if extra_node is not None else []))
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location=f"{path.name}.data", size_threshold=0)
    return path


def sd15_like(path: Path) -> Path:
    """A UNet-shaped ONNX without SDXL's text_embeds/time_ids (an SD 1.x export)."""
    ins = [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["B", 4, "H", "W"]),
           helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [1]),
           helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["B", 77, 64])]
    out = helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, ["B", 4, "H", "W"])
    g = helper.make_graph([helper.make_node("Identity", ["sample"], ["noise_pred"], name="/unet/Identity")],
                          "sd15", ins, [out])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


LINEAR_SHAPES = "x:4x64"
