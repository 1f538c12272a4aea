"""Strongly typed FP16 conversion: runs in onnxruntime close to FP32, keeps the FP32 islands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.graph.conftest import plain_model
from trtkit.errors import TrtkitError
from trtkit.exporter import run_onnxruntime
from trtkit.graph.fp16 import convert_fp16


def _types(model: onnx.ModelProto) -> dict[str, int]:
    out = {i.name: i.data_type for i in model.graph.initializer}
    for vi in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        out[vi.name] = vi.type.tensor_type.elem_type
    return out


@pytest.mark.parametrize("io_dtype", ["float32", "float16"])
def test_fp16_runs_close_to_fp32(io_dtype: str, tmp_path: Path, tiny_unet_onnx: Path, tiny_feeds, tiny_ref,
                                 record_property) -> None:
    out = convert_fp16(tiny_unet_onnx, tmp_path / "fp16.onnx", io_dtype=io_dtype)
    model = onnx.load(str(out))
    types = _types(model)
    F, H = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert all(types[i.name] == (H if io_dtype == "float16" else F) for i in model.graph.input)
    assert types["noise_pred"] == (H if io_dtype == "float16" else F)
    # big weights are FP16: the file is about half the size
    assert out.stat().st_size < 0.6 * tiny_unet_onnx.stat().st_size
    # GroupNorm (InstanceNormalization) and the sinusoidal time embedding stay FP32, behind casts
    for n in model.graph.node:
        if n.op_type in ("InstanceNormalization", "Sin", "Cos"):
            assert types[n.input[0]] == F and types[n.output[0]] == F, n.name
        if n.op_type in ("MatMul", "Conv", "Softmax", "LayerNormalization"):
            assert types[n.output[0]] == H, n.name
    feeds = {k: v.astype(np.float16) if io_dtype == "float16" and v.dtype == np.float32 else v
             for k, v in tiny_feeds.items()}
    got = run_onnxruntime(out, feeds)[0].astype(np.float32)
    err = float(np.max(np.abs(got - tiny_ref)) / np.max(np.abs(tiny_ref)))
    record_property(f"rel_err_fp16_{io_dtype}", err)
    print(f"\nFP16 ({io_dtype} I/O): output error vs FP32 {err:.5f}")
    assert err < 0.01


def test_fp16_errors(tmp_path: Path, tiny_unet_onnx: Path) -> None:
    with pytest.raises(TrtkitError, match="io_dtype"):
        convert_fp16(tiny_unet_onnx, tmp_path / "x.onnx", io_dtype="bfloat16")
    with pytest.raises(TrtkitError, match="must not overwrite"):
        convert_fp16(tiny_unet_onnx, tiny_unet_onnx)
    with pytest.raises(TrtkitError, match="does not exist"):
        convert_fp16(tmp_path / "nope.onnx", tmp_path / "x.onnx")
    # a graph with nothing special still converts and runs
    onnx.save(plain_model(), str(tmp_path / "p.onnx"))
    out = convert_fp16(tmp_path / "p.onnx", tmp_path / "p16.onnx")
    a = np.ones((2, 3), np.float32)
    assert np.allclose(run_onnxruntime(out, {"a": a, "b": -2 * a})[0], 0.0)
    assert not (tmp_path / "x.onnx").exists()


def test_fp16_over_fp8_qdq_graph(tmp_path: Path, quantized_cache, tiny_feeds, tiny_ref) -> None:
    """`trtkit build x.fp8.onnx --fp8 --fp16`: FP8 tensors (no numpy dtype) must pass through untouched."""
    fp8 = quantized_cache("fp8", 3, fp16=False).path
    out = convert_fp16(fp8, tmp_path / "fp8.fp16.onnx")
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    e4m3 = onnx.TensorProto.FLOAT8E4M3FN
    assert sum(i.data_type == e4m3 for i in model.graph.initializer) == \
        sum(i.data_type == e4m3 for i in onnx.load(str(fp8)).graph.initializer) > 0
    # Same bound as the Q/DQ pass's own FP8 + FP16 graphs against FP32 (tests/graph/test_qdq.py).
    got = run_onnxruntime(out, tiny_feeds)[0].astype(np.float32)
    assert float(np.max(np.abs(got - tiny_ref)) / np.max(np.abs(tiny_ref))) < 0.16
