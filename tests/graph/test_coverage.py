"""Coverage reports read back from the quantized files themselves."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from rich.console import Console

from tests.graph.conftest import plain_model
from trtkit.graph.coverage import coverage, render_coverage


def test_coverage_of_fp8_level4(quantized_cache) -> None:
    r = coverage(quantized_cache("fp8", 4.0).path)
    assert (r.precision, r.level) == ("fp8", 4.0)
    k = r.by_kind()
    assert (k["linear"]["quantized"], k["linear"]["total"], k["linear"]["types"]) == (126, 148, {"fp8": 126})
    assert (k["conv"]["quantized"], k["conv"]["total"]) == (26, 35)
    assert (k["attention"]["quantized"], k["attention"]["total"]) == (24, 24)
    b = r.by_block()
    assert list(b) == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1", "other"]
    assert b["down_blocks.1"]["attention"] == {"total": 8, "quantized": 8, "types": {"fp8": 8}}
    assert b["other"]["conv"]["quantized"] == 0  # conv_in, conv_out
    reasons = r.reasons()
    assert reasons["linear: default exclusion (time_emb_proj)"] == 12
    assert reasons["conv: default exclusion (conv_shortcut)"] == 7
    assert sum(reasons.values()) == len(r.unquantized()) == 22 + 9
    doc = json.loads(json.dumps(r.to_json()))
    assert doc["by_kind"]["attention"]["quantized"] == 24 and not doc["nothing_matched"]
    con = Console(record=True, width=160)
    render_coverage(r, con)
    text = con.export_text()
    assert "126/148 fp8" in text and "default exclusion (proj_out)" in text


def test_coverage_int8_reasons_and_unquantized(quantized_cache, tiny_unet_onnx: Path) -> None:
    r = coverage(quantized_cache("int8", 2.5).path)
    reasons = r.reasons()
    assert reasons["attention: INT8 leaves attention in FP16 (--attention forces it; in Python quantize_attention=True)"] == 24
    assert reasons["linear: level 2.5 quantizes no such linear (needs level >= 3)"] == 30
    assert r.by_kind()["linear"]["types"] == {"int8": 96}
    plain = coverage(tiny_unet_onnx)
    assert plain.precision is None and plain.by_kind()["conv"] == {"total": 35, "quantized": 0, "types": {}}
    assert set(plain.reasons()) == {f"{k}: no Q/DQ in this graph" for k in ("linear", "conv", "attention")}


def test_coverage_nothing_matched(tmp_path: Path) -> None:
    onnx.save(plain_model(), str(tmp_path / "p.onnx"))
    r = coverage(tmp_path / "p.onnx")
    assert r.nothing_matched and "nothing matched" in r.notes[-1]
    con = Console(record=True, width=120)
    render_coverage(r, con)
    assert "nothing matched" in con.export_text()


def test_vae_decoder_blocks(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Not only UNets: the tiny VAE decoder quantizes, and its blocks are found one level down."""
    from trtkit.exporter import ExportConfig, export
    from trtkit.graph.qdq import QuantizeConfig, quantize

    src = export(ExportConfig(model_dir=tiny_model_dir, component="vae_decoder", profile="tiny-256",
                              out_dir=tmp_path, check=False)).path
    r = quantize(QuantizeConfig(onnx_path=src, output=tmp_path / "q.onnx", precision="int8"))
    assert r.counts["conv"]["quantized"] == r.counts["conv"]["total"] - 3  # conv_in, conv_out, one shortcut
    blocks = coverage(r.path).blocks()
    assert blocks[0] == "decoder.mid_block" and blocks[-1] == "other" and "decoder.up_blocks.0" in blocks
