"""ONNX models made in code for the runtime tests (a unique module name: every test folder is on sys.path)."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper


def bf16_relu(path: Path, hidden: int = 64) -> Path:
    """x[B, hidden] (bfloat16) -> Relu -> y (bfloat16)."""
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["batch", hidden])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["batch", hidden])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="/act/Relu")], "bf16_relu", [x], [y])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def identity(path: Path, hidden: int = 64) -> Path:
    """x[B, hidden] -> Identity -> y: an engine that may need no activation memory at all."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hidden])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name="/id")], "identity", [x], [y])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
