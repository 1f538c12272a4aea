"""`trtkit build` on the tiny FLUX transformer and its T5: the DiT presets give the shapes (from the
export's `trtkit.dit_dims`), and the FP8 Q/DQ pass runs inside the build, on TensorRT-RTX (SM 8.9, AOT)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trtkit.builder.build import build
from trtkit.builder.config import BuildConfig

pytestmark = pytest.mark.rtx


def test_flux_fp8_build_with_dit_presets(tiny_dit_onnx, tmp_path: Path) -> None:
    r = build(BuildConfig(onnx=tiny_dit_onnx("flux"), output=tmp_path / "transformer.plan",
                          profiles=("flux-dyn",), precision="fp8", target_cc=("8.9",), progress=False))
    doc = json.loads(r.metadata.read_text())
    shapes = doc["profiles"][0]["shapes"]
    # 512..1536 px: (H/16)(W/16) packed tokens 1024..9216; 512 T5 tokens; guidance input (FLUX.1-dev layout)
    assert shapes["hidden_states"]["min"] == [1, 1024, 16] and shapes["hidden_states"]["max"] == [4, 9216, 16]
    assert shapes["img_ids"]["opt"] == [4096, 3] and shapes["txt_ids"]["opt"] == [512, 3]
    assert shapes["guidance"]["opt"] == [1]
    assert doc["precision"]["qdq_types"] == ["fp8"] and doc["precision"]["fp16_rest"] is True
    assert "fp8 Q/DQ pass applied, the rest converted to FP16" in doc["notes"]


def test_flux_t5_fp16_build(tiny_dit_dir, tmp_path: Path) -> None:
    from trtkit.exporter import ExportConfig, export

    onnx = export(ExportConfig(model_dir=tiny_dit_dir("flux"), component="text_encoder_2", profile="flux-1024",
                               out_dir=tmp_path / "onnx", check=False)).path
    r = build(BuildConfig(onnx=onnx, output=tmp_path / "t5.plan", profiles=("flux-1024",), precision="fp16",
                          target_cc=("8.9",), progress=False))
    doc = json.loads(r.metadata.read_text())
    assert doc["profiles"][0]["shapes"]["input_ids"]["opt"] == [1, 512]  # FLUX.1-dev's T5 length, no CFG
    assert r.plan.stat().st_size > 0
