"""Engine reports from saved layer information (the fixtures) cross-checked against a Q/DQ ONNX whose
node names match them: every outcome and reason is asserted exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from inspect_helpers import B0, TB, fixture_text, write_engine

from trtkit.inspector.report import engine_report, inspect

pytestmark = pytest.mark.rtx  # the plan files are real (tiny) TensorRT-RTX plans built on the CPU


def _meta(plan_bytes: bytes, onnx: Path | None = None, precision: str = "int8") -> dict:
    # The keys `trtkit build` writes (trtkit/builder/metadata.py docstring).
    return {"format": "trtkit-engine", "version": 1,
            "backend": {"name": "rtx", "module": "tensorrt_rtx", "version": "1.7.1.116"},
            "precision": {"requested": precision, "qdq_types": [precision], "strongly_typed": True},
            "profiles": [{"name": "tiny-256", "shapes": {"sample": {"min": [2, 4, 32, 32], "opt": [2, 4, 32, 32],
                                                                   "max": [8, 4, 32, 32]}}}],
            "io": {"inputs": [{"name": "sample", "shape": [-1, 4, -1, -1], "dtype": "float"}],
                   "outputs": [{"name": "noise_pred", "shape": [-1, 4, -1, -1], "dtype": "float"}]},
            "onnx": {"path": str(onnx) if onnx else None}, "plan": {"bytes": len(plan_bytes)},
            "layers": {"saved": True, "path": "unet.layers.json"}}


@pytest.fixture
def int8_engine(tmp_path, rtx_plan_bytes, qdq_onnx):
    return write_engine(tmp_path / "int8", rtx_plan_bytes, fixture_text("trt10_detailed.json"),
                        _meta(rtx_plan_bytes, qdq_onnx))


@pytest.fixture
def fp8_engine(tmp_path, rtx_plan_bytes, fp8_onnx):
    return write_engine(tmp_path / "fp8", rtx_plan_bytes, fixture_text("trt11_detailed.json"),
                        _meta(rtx_plan_bytes, fp8_onnx, "fp8"))


def _outcomes(rep):
    short = {c.node: c.node.replace(f"{B0}/", "").replace(f"{TB}/", "") for c in rep.crosscheck}
    return {short[c.node]: (c.outcome, c.precision, c.reason.split(":")[0]) for c in rep.crosscheck}


def test_int8_engine_crosscheck(int8_engine, qdq_onnx):
    rep = engine_report(int8_engine, from_files=True)  # the ONNX path comes from the metadata
    assert rep.src.source == "saved" and rep.onnx is not None and rep.onnx.path == qdq_onnx
    assert _outcomes(rep) == {
        "conv1/Conv": ("8-bit", "INT8", "CaskConvolution kernel"),
        "conv2/Conv": ("fell back", "FP16", "unfused Q/DQ"),
        "attn1/to_q/MatMul": ("unknown", "FP16", "inside a Myelin region"),
        "attn1/to_k/MatMul": ("unknown", "FP16", "inside a Myelin region"),
        "attn1/to_v/MatMul": ("unknown", "FP16", "inside a Myelin region"),
        "attn1/to_out.0/MatMul": ("fell back", "FP16", "missing pair"),
        "ff/net.0/proj/MatMul": ("8-bit", "INT8", "CaskGemmMatrixMultiply kernel"),
        "ff/net.2/MatMul": ("fell back", "FP16", "reformat"),
    }
    conv2 = next(c for c in rep.crosscheck if c.node == f"{B0}/conv2/Conv")
    assert f"{B0}/conv2/input_quantizer/DequantizeLinear ran as its own layer" in conv2.reason
    assert conv2.block == "down_blocks.0" and conv2.module == "down_blocks.0.resnets.0.conv2"
    assert [(a.module.rsplit(".", 1)[-1], a.status) for a in rep.attention] == [("attn1", "fused"),
                                                                             ("attn2", "not fused")]
    assert "CaskSoftMaxV2" in rep.attention[1].detail


def test_compute_share_by_flops(int8_engine):
    rep = engine_report(int8_engine, from_files=True)
    conv = 2 * (2 * 32 * 32 * 32) * 32 * 9  # conv1, conv2 (3x3, 32->32 at 32x32, batch 2)
    conv_io = 2 * (2 * 32 * 32 * 32) * 4 * 9  # conv_in (4->32), conv_out (32->4)
    ff_in, ff_out = 2 * (2 * 256 * 512) * 64, 2 * (2 * 256 * 64) * 256
    to_out = 2 * (2 * 256 * 64) * 64
    bmm1, bmm2 = 2 * (2 * 4 * 256 * 77) * 16, 2 * (2 * 4 * 256 * 16) * 77
    int8 = conv + ff_in
    fp16 = conv + 2 * conv_io + ff_out + to_out + bmm1 + bmm2
    cs = rep.compute_share()
    assert cs["basis"] == "flops" and cs["layers_without_flops"] == 1  # the Myelin region
    assert cs["share"]["INT8"] == pytest.approx(int8 / (int8 + fp16))
    assert cs["share"]["FP16"] == pytest.approx(fp16 / (int8 + fp16))
    assert rep.by_precision() == {"FP16": 13, "INT8": 4, "FP32": 1}
    blocks = rep.block_picture()
    assert list(blocks) == ["conv_in", "down_blocks.0", "down_blocks.1", "conv_out"]
    assert blocks["down_blocks.0"] == {"INT8": conv, "FP16": conv}


def test_fp8_engine_trt11(fp8_engine):
    rep = engine_report(fp8_engine, from_files=True)
    out = _outcomes(rep)
    assert out["conv1/Conv"] == ("8-bit", "FP8", "CaskConvolution kernel")
    assert out["attn1/MatMul"] == ("8-bit", "FP8", "Myelin kernel")
    assert out["attn1/MatMul_1"] == ("8-bit", "FP8", "Myelin kernel")
    assert out["attn1/to_q/MatMul"] == ("8-bit", "FP8", "Myelin kernel")
    assert out["conv2/Conv"][0] == "fell back"
    assert sum(1 for v in out.values() if v[0] == "8-bit") == 7
    assert rep.attention[0].status == "fused" and "e4m3" in rep.attention[0].detail
    assert rep.src.layers.schema == "trt11"


def test_names_only_says_what_it_cannot_tell(tmp_path, rtx_plan_bytes, qdq_onnx):
    plan = write_engine(tmp_path, rtx_plan_bytes, fixture_text("names_only.json"), _meta(rtx_plan_bytes, qdq_onnx))
    rep = engine_report(plan, from_files=True)
    assert any("names only" in n for n in rep.src.notes)
    # a Myelin region names only its first and last node; separate layers are still visible by name
    assert [a.status for a in rep.attention] == ["unknown", "not fused"]
    assert {c.outcome for c in rep.crosscheck} == {"unknown"}
    assert rep.compute_share()["basis"] == "layer count"


def test_metadata_only(tmp_path, rtx_plan_bytes):
    meta = _meta(rtx_plan_bytes)
    meta["layers"] = {"saved": False, "path": None, "reason": "not saved: tensorrt_rtx cannot deserialize on this "
                      "machine (no CUDA driver)"}
    plan = write_engine(tmp_path, rtx_plan_bytes, None, meta)
    rep = engine_report(plan, from_files=True)
    j = rep.to_json()
    assert rep.src.source == "none" and not rep.layers
    assert any("no per-layer information" in n and "no CUDA driver" in n for n in j["notes"])
    assert any("no ONNX model" in n for n in j["notes"])
    assert dict(j["metadata_summary"])["precision"].startswith("int8")
    assert "sample 2x4x32x32 / 2x4x32x32 / 8x4x32x32" in dict(j["metadata_summary"])["profile tiny-256 (min/opt/max)"]
    json.dumps(j)


def test_no_metadata_no_layers(tmp_path, rtx_plan_bytes):
    plan = write_engine(tmp_path, rtx_plan_bytes, None, None)
    rep = engine_report(plan, from_files=True)
    assert any("no metadata file unet.json" in n for n in rep.src.notes)
    assert any("no unet.layers.json beside the plan" in n for n in rep.src.notes)


def test_compare_int8_fp8(int8_engine, fp8_engine):
    c = inspect(int8_engine, fp8_engine, from_files=True)
    rows = {r["node"]: r for r in c.rows}
    assert (rows[f"{B0}/conv1/Conv"]["a_precision"], rows[f"{B0}/conv1/Conv"]["b_precision"]) == ("INT8", "FP8")
    assert rows[f"{B0}/conv2/Conv"]["same"] and rows["/unet/conv_in/Conv"]["same"]
    assert rows[f"{TB}/attn1/Softmax"]["b_type"] == "Myelin"
    # matched by ONNX compute node: Conv x4, to_q/k/v, attn1/attn2 (MatMul, Softmax, MatMul_1), to_out, ff x2
    assert len(c.rows) == 16
    assert sum(not r["same"] for r in c.rows) == 8
    json.dumps(c.to_json())


def test_myelin_flops_from_the_onnx(tmp_path, rtx_plan_bytes, tiny_unet_onnx):
    """A Myelin region has no dimensions of its own: its FLOPs come from the ONNX nodes it holds, at the opt
    shapes the metadata records (the fixture's node names are the real tiny UNet's)."""
    meta = _meta(rtx_plan_bytes, tiny_unet_onnx)
    meta["profiles"][0]["shapes"] = {"sample": {"opt": [2, 4, 32, 32]}, "timestep": {"opt": [1]},
                                     "encoder_hidden_states": {"opt": [2, 77, 64]}, "text_embeds": {"opt": [2, 32]},
                                     "time_ids": {"opt": [2, 6]}}
    plan = write_engine(tmp_path, rtx_plan_bytes, fixture_text("trt10_detailed.json"), meta)
    rep = engine_report(plan, from_files=True)
    myelin = next(x for x in rep.layers if x.type == "Myelin")
    proj = 2 * (2 * 256 * 64) * 64  # to_q / to_k / to_v: [2, 256, 64] x [64, 64]
    bmm = 2 * (2 * 4 * 256 * 256) * 16  # 4 heads of 16, 256 tokens, both batched matmuls
    assert rep.layer_flops(myelin) == 3 * proj + 2 * bmm
    cs = rep.compute_share()
    assert cs["basis"] == "flops" and cs["layers_without_flops"] == 0
    own = sum(x.flops() or 0 for x in rep.layers)
    assert sum(cs["flops"].values()) == own + 3 * proj + 2 * bmm
