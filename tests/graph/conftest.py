"""Fixtures of the graph room: sample feeds and FP32 reference of the tiny UNet, and small hand-built
graphs (an attention block with a chosen head size, a Gemm, a graph with nothing to match)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper


@pytest.fixture(scope="session")
def tiny_feeds(tiny_unet_onnx: Path) -> dict[str, np.ndarray]:
    from trtkit.graph.qdq import _sample_feeds

    # seed 1: not the seed the pass calibrates on, so the error is measured on unseen inputs
    return _sample_feeds(onnx.load(str(tiny_unet_onnx)), "tiny-256", seed=1)


@pytest.fixture(scope="session")
def tiny_ref(tiny_unet_onnx: Path, tiny_feeds: dict[str, np.ndarray]) -> np.ndarray:
    from trtkit.exporter import run_onnxruntime

    return run_onnxruntime(tiny_unet_onnx, tiny_feeds)[0]


@pytest.fixture(scope="session")
def quantized_cache(tmp_path_factory: pytest.TempPathFactory, tiny_unet_onnx: Path):
    """quantize(precision, level, fp16) once per session (several test files read the same graphs)."""
    from trtkit.graph.qdq import QuantizeConfig, quantize

    root = tmp_path_factory.mktemp("quantized")
    cache: dict[tuple, object] = {}

    def get(precision: str, level: float, fp16: bool = True):
        key = (precision, float(level), fp16)
        if key not in cache:
            out = root / f"unet.{precision}.l{level:g}.{'fp16' if fp16 else 'fp32'}.onnx"
            cache[key] = quantize(QuantizeConfig(onnx_path=tiny_unet_onnx, output=out, precision=precision,
                                                 level=level, fp16=fp16))
        return cache[key]

    return get


def attention_model(head: int = 16, heads: int = 2, seq: int = 8, opset: int = 19, scoped: bool = True) -> onnx.ModelProto:
    """x[1,S,C] -> to_q/to_k/to_v (MatMul, weight [C, C]) -> heads -> q·kᵀ·s -> Softmax -> ·v -> to_out (Gemm)."""
    rng = np.random.default_rng(0)
    c = head * heads
    p = "/m/blocks.0/attn1/" if scoped else ""

    def init(name: str, shape: tuple[int, ...]) -> TensorProto:
        return helper.make_tensor(name, TensorProto.FLOAT, shape, rng.standard_normal(shape).astype(np.float32) * 0.2)

    inits = [init("wq", (c, c)), init("wk", (c, c)), init("wv", (c, c)), init("m.blocks.0.attn1.to_out.0.weight", (c, c)),
             init("m.blocks.0.attn1.to_out.0.bias", (c,)),
             helper.make_tensor("shape4", TensorProto.INT64, (4,), [1, seq, heads, head]),
             helper.make_tensor("shape3", TensorProto.INT64, (3,), [1, seq, c]),
             helper.make_tensor("shape2", TensorProto.INT64, (2,), [seq, c]),
             helper.make_tensor("scale", TensorProto.FLOAT, (), [head ** -0.5])]
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "wq"], ["q0"], name=f"{p}to_q/MatMul"),
        n("MatMul", ["x", "wk"], ["k0"], name=f"{p}to_k/MatMul"),
        n("MatMul", ["x", "wv"], ["v0"], name=f"{p}to_v/MatMul"),
        n("Reshape", ["q0", "shape4"], ["q1"], name=f"{p}Reshape"),
        n("Reshape", ["k0", "shape4"], ["k1"], name=f"{p}Reshape_1"),
        n("Reshape", ["v0", "shape4"], ["v1"], name=f"{p}Reshape_2"),
        n("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3], name=f"{p}Transpose"),
        n("Transpose", ["k1"], ["k"], perm=[0, 2, 3, 1], name=f"{p}Transpose_1"),
        n("Transpose", ["v1"], ["v"], perm=[0, 2, 1, 3], name=f"{p}Transpose_2"),
        n("MatMul", ["q", "k"], ["s0"], name=f"{p}MatMul"),
        n("Mul", ["s0", "scale"], ["s"], name=f"{p}Mul"),
        n("Softmax", ["s"], ["prob"], axis=-1, name=f"{p}Softmax"),
        n("MatMul", ["prob", "v"], ["o0"], name=f"{p}MatMul_1"),
        n("Transpose", ["o0"], ["o1"], perm=[0, 2, 1, 3], name=f"{p}Transpose_3"),
        n("Reshape", ["o1", "shape2"], ["o2"], name=f"{p}Reshape_3"),
        n("Gemm", ["o2", "m.blocks.0.attn1.to_out.0.weight", "m.blocks.0.attn1.to_out.0.bias"], ["o3"], transB=1,
          name=f"{p}to_out.0/Gemm"),
        n("Reshape", ["o3", "shape3"], ["y"], name=f"{p}Reshape_4"),
    ]
    g = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, c])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, c])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    if scoped:
        e = m.metadata_props.add()
        e.key, e.value = "trtkit.scope", "/m/"
    return onnx.shape_inference.infer_shapes(m)


def plain_model() -> onnx.ModelProto:
    """Add/Relu only: nothing to quantize."""
    n = helper.make_node
    g = helper.make_graph([n("Add", ["a", "b"], ["c"], name="add"), n("Relu", ["c"], ["y"], name="relu")], "plain",
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [2, 3]) for x in "ab"],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 9
    return m


@pytest.fixture
def attention_onnx(tmp_path: Path):
    def make(**kw) -> Path:
        p = tmp_path / f"attn_{'_'.join(f'{k}{v}' for k, v in kw.items()) or 'default'}.onnx"
        onnx.save(attention_model(**kw), str(p))
        return p

    return make
