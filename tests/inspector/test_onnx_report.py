"""The ONNX side of inspect, for real on the tiny UNet at each quantization level: the per-node scan
(this module, on the onnx protobuf) must agree with the graph room's coverage (graphsurgeon patterns) and
with what quantize() says it did."""

from __future__ import annotations

from pathlib import Path

import pytest

from trtkit.errors import TrtkitError
from trtkit.inspector.onnx_report import block_of, module_of, onnx_report, scan_onnx

LEVELS = [("int8", 1), ("int8", 2), ("int8", 2.5), ("int8", 3), ("fp8", 4)]


@pytest.fixture(scope="module")
def quantized(tiny_unet_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    qdq = pytest.importorskip("trtkit.graph.qdq")
    out = tmp_path_factory.mktemp("levels")
    res = {}
    for prec, level in LEVELS:
        r = qdq.quantize(qdq.QuantizeConfig(onnx_path=tiny_unet_onnx, output=out / f"unet.{prec}.l{level}.onnx",
                                            precision=prec, level=level))
        res[(prec, level)] = r
    return res


def test_unquantized_tiny_unet(tiny_unet_onnx):
    scan = scan_onnx(tiny_unet_onnx)
    # 132 bias-free Linear MatMuls + 16 Gemm; 35 Conv; 24 attention modules x 2 batched matmuls
    assert scan.summary() == {"linear": {"total": 148}, "conv": {"total": 35}, "attention": {"total": 48}}
    assert len(scan.attention) == 24 and not scan.quantized
    a = scan.attention[0]
    assert a.module == "down_blocks.1.attentions.0.transformer_blocks.0.attn1" and a.block == "down_blocks.1"
    assert a.nodes == tuple(f"/unet/down_blocks.1/attentions.0/transformer_blocks.0/attn1/{n}"
                            for n in ("MatMul", "Softmax", "MatMul_1"))
    blocks = {n.block for n in scan.nodes}
    assert {"conv_in", "down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1", "conv_out",
            "time_embedding", "add_embedding"} == blocks


@pytest.mark.parametrize("prec,level", LEVELS)
def test_each_level_agrees_with_coverage_and_quantize(quantized, prec, level):
    from trtkit.graph.coverage import coverage

    r = quantized[(prec, level)]
    rep = onnx_report(r.path)
    s = rep.scan.summary()
    cov = coverage(r.path).by_kind()
    for kind in ("linear", "conv"):
        mine = s[kind].get(prec, 0)
        assert mine == cov[kind]["quantized"] == r.counts[kind]["quantized"], (kind, s, cov, r.counts)
        assert s[kind]["total"] == r.counts[kind]["total"]
    # attention: two batched matmuls per module, both inputs behind Q/DQ when the module is quantized
    assert s["attention"].get(prec, 0) == 2 * cov["attention"]["quantized"] == 2 * r.counts["attention"]["quantized"]
    assert rep.coverage is not None and rep.to_json()["coverage"]["by_kind"] == cov
    qtypes = {n.qtype for n in rep.scan.quantized}
    assert qtypes == {prec}


def test_levels_grow(quantized):
    n = [len(scan_onnx(quantized[k].path).quantized) for k in LEVELS]
    assert n == sorted(n) and n[0] > 0


def test_module_and_block_names():
    assert module_of("/unet/down_blocks.1/attentions.0/proj_in/MatMul", "/unet/") == "down_blocks.1.attentions.0.proj_in"
    assert module_of("/unet/conv_in/Conv", "/unet/") == "conv_in"
    assert block_of("up_blocks.0.resnets.1.conv1") == "up_blocks.0" and block_of("mid_block.attentions.0") == "mid_block"


def test_not_onnx(tmp_path):
    p = tmp_path / "x.onnx"
    p.write_bytes(b"\xff\xfe not a protobuf" * 10)
    with pytest.raises(TrtkitError, match="is not a readable ONNX model"):
        onnx_report(p)
    with pytest.raises(TrtkitError, match="does not exist"):
        scan_onnx(tmp_path / "missing.onnx")
