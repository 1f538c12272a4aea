"""Graphs in ModelOpt's own Q/DQ form: an `mtq.quantize`d tiny UNet exported with ModelOpt's quantizer
symbolics (INT8 level 3, FP8 level 4 with FP8 attention) reaches the same coverage report and an RTX
build as trtkit's own graphs; onnxruntime runs them close to FP32. The first test needs no ModelOpt:
a hand-built graph in that form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from trtkit.graph.coverage import coverage

SHAPES = {"sample": (2, 4, 32, 32), "timestep": (1,), "encoder_hidden_states": (2, 77, 64), "text_embeds": (2, 32),
          "time_ids": (2, 6)}


def modelopt_linear(tmp: Path) -> Path:
    """x -> Q/DQ -> MatMul(Transpose(DQ(Q(W)))) the way ModelOpt's INT8 export writes a Linear."""
    rng = np.random.default_rng(0)
    n = helper.make_node
    p = "/m/blocks.0/ff/"
    inits = [helper.make_tensor("m.blocks.0.ff.weight", TensorProto.FLOAT, (8, 16),
                                rng.standard_normal((8, 16)).astype(np.float32).ravel()),
             helper.make_tensor("ws", TensorProto.FLOAT, (8,), np.full(8, 0.02, np.float32)),
             helper.make_tensor("wz", TensorProto.INT8, (8,), np.zeros(8, np.int8)),
             helper.make_tensor("xs", TensorProto.FLOAT, (), [0.03]), helper.make_tensor("xz", TensorProto.INT8, (), [0])]
    nodes = [n("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name=f"{p}input_quantizer/QuantizeLinear"),
             n("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name=f"{p}input_quantizer/DequantizeLinear"),
             n("QuantizeLinear", ["m.blocks.0.ff.weight", "ws", "wz"], ["wq"], axis=0,
               name=f"{p}weight_quantizer/QuantizeLinear"),
             n("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0, name=f"{p}weight_quantizer/DequantizeLinear"),
             n("Transpose", ["wd"], ["wt"], perm=[1, 0], name=f"{p}Transpose"),
             n("MatMul", ["xd", "wt"], ["y"], name=f"{p}MatMul")]
    g = helper.make_graph(nodes, "mo", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    e = m.metadata_props.add()
    e.key, e.value = "trtkit.scope", "/m/"
    onnx.save(m, str(tmp / "mo.onnx"))
    return tmp / "mo.onnx"


def test_float_weight_quantized_in_graph_counts(tmp_path: Path) -> None:
    r = coverage(modelopt_linear(tmp_path))
    assert [(i.module, i.kind, i.quantized, i.type) for i in r.items] == [("blocks.0.ff", "linear", True, "int8")]


# --------------------------------------------------------------------------- a real mtq.quantize'd UNet

@pytest.fixture(scope="module")
def modelopt_onnx(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{precision: ONNX} for INT8 level 3 (FP32 export) and FP8 level 4 (FP16 export, FP8 attention)."""
    pytest.importorskip("modelopt.torch.quantization")
    from tests.calibration.test_modelopt_state import mtq_unet
    from trtkit.calibration.modelopt_flow import export_onnx

    out = tmp_path_factory.mktemp("modelopt_onnx")
    paths = {}
    for precision, level in (("int8", 3.0), ("fp8", 4.0)):
        unet = mtq_unet(tiny_model_dir, precision, level, seeds=(0,))
        paths[precision] = export_onnx(unet, SHAPES, out / f"unet.{precision}.onnx", precision,
                                       half=precision == "fp8")
    return paths


@pytest.mark.modelopt
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_coverage_of_modelopt_export(precision: str, modelopt_onnx: dict[str, Path]) -> None:
    r = coverage(modelopt_onnx[precision])
    kinds = r.by_kind()
    # trtkit's own level 3/4 graph: linear 126, conv 26 (tests/graph/test_qdq.py). ModelOpt's filter has no
    # proj_out: 6 more linears. Its FP8 exporter stores every conv weight in FP8, the 9 it leaves out too.
    assert (kinds["linear"]["quantized"], kinds["conv"]["quantized"]) == (132, 26)
    assert kinds["linear"]["types"] == {precision: 132} and kinds["conv"]["types"] == {precision: 26}
    assert kinds["attention"]["quantized"] == (24 if precision == "fp8" else 0)
    if precision == "fp8":
        assert kinds["attention"]["types"] == {"fp8": 24}
        assert r.reasons()["conv: weight-only fp8 (activation not quantized)"] == 9


@pytest.mark.modelopt
def test_onnxruntime_close_to_fp32(modelopt_onnx: dict[str, Path], tiny_unet_onnx: Path,
                                   tiny_feeds: dict[str, np.ndarray], tiny_ref: np.ndarray, tmp_path: Path) -> None:
    from trtkit.exporter import run_onnxruntime
    from trtkit.graph.modelopt_form import to_native

    def err(out: np.ndarray) -> float:
        return float(np.abs(out.astype(np.float32) - tiny_ref).max() / np.abs(tiny_ref).max())

    assert err(run_onnxruntime(modelopt_onnx["int8"], tiny_feeds)[0]) < 0.08  # trtkit's own INT8 bound
    m = onnx.load(str(modelopt_onnx["fp8"]))
    assert to_native(m) > 0  # FP8 Q/DQ left in the `trt` domain by ModelOpt's exporter
    onnx.save(m, str(tmp_path / "native.onnx"))
    half = {k: v.astype(np.float16) for k, v in tiny_feeds.items()}
    e = err(run_onnxruntime(tmp_path / "native.onnx", half)[0])
    # trtkit's own FP8 bound is 0.16; ModelOpt's exporter also stores FP8 weights on conv_in, conv_out and
    # conv_shortcut, which costs about 0.02 more (docs/quantization.md, "FP8 on the tiny UNet: the bisection")
    assert np.isfinite(e) and e < 0.2, e


@pytest.mark.modelopt
@pytest.mark.rtx
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_modelopt_export_builds_with_rtx(precision: str, modelopt_onnx: dict[str, Path]) -> None:
    from tests.graph.test_rtx_build import QDQ_TROUBLE, build

    ok, errors, warnings = build(modelopt_onnx[precision])
    assert ok, errors
    assert not [w for w in warnings if QDQ_TROUBLE.search(w) and "conv weight/activation scales" not in w
                and "Converting conv" not in w], warnings


def test_to_native_fp8_survives_onnxruntime_qdq_propagation(tmp_path: Path) -> None:
    """ModelOpt's FP8 activation Q/DQ (custom ops, DQ without a zero point) before a Transpose: once
    native, onnxruntime at its default optimization level must give the FP8 round trip, negatives included
    (its QDQ propagation copies the DQ's inputs into a new Q; without a zero point that Q was uint8)."""
    import torch

    from trtkit.exporter import run_onnxruntime
    from trtkit.graph.modelopt_form import to_native

    scale = 0.01
    nodes = [helper.make_node("TRT_FP8QuantizeLinear", ["x", "s"], ["q"], domain="trt"),
             helper.make_node("TRT_FP8DequantizeLinear", ["q", "s"], ["dq"], domain="trt"),
             helper.make_node("Transpose", ["dq"], ["t"], perm=[1, 0]),
             helper.make_node("MatMul", ["t", "w"], ["y"])]
    w = np.eye(4, dtype=np.float32)
    graph = helper.make_graph(nodes, "modelopt_fp8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 4])],
                              [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
                               helper.make_tensor("w", TensorProto.FLOAT, [4, 4], w.reshape(-1).tolist())])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19), helper.make_opsetid("trt", 1)])
    assert to_native(m) == 3  # Q and DQ renamed, the DQ given the FP8 zero point
    assert all(len(n.input) == 3 for n in m.graph.node if n.op_type.endswith("QuantizeLinear"))
    onnx.checker.check_model(m)
    onnx.save(m, str(tmp_path / "native.onnx"))
    x = np.linspace(-3.0, 3.0, 32, dtype=np.float32).reshape(4, 8)
    ref = (torch.from_numpy(x) / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float().numpy() * scale
    out = run_onnxruntime(tmp_path / "native.onnx", {"x": x})[0]
    np.testing.assert_allclose(out, ref.T, rtol=0, atol=1e-6)
    assert to_native(m) == 0  # idempotent: nothing left to change, no second zero point
