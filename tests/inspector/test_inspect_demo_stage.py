"""The inspect stage of `trtkit demo`: coverage of the ONNX, the engine report from its files, one page."""

from __future__ import annotations

import time

import pytest
from inspect_helpers import fixture_text, write_engine

from trtkit.demo import DemoConfig, DemoState, Skipped
from trtkit.inspector.demo_stage import demo_stage


def test_skips_without_inputs(tmp_path):
    with pytest.raises(Skipped):
        demo_stage(DemoState(DemoConfig(workdir=tmp_path)))


def test_onnx_only(tmp_path, tiny_unet_onnx):
    t0 = time.perf_counter()
    msg, files = demo_stage(DemoState(DemoConfig(workdir=tmp_path), onnx=tiny_unet_onnx))
    assert time.perf_counter() - t0 < 5
    assert msg == "unet.onnx: 0 of 231 linear/conv/attention nodes behind Q/DQ"
    assert files == [tmp_path / "report.html"] and "Q/DQ coverage of unet.onnx" in files[0].read_text()


@pytest.mark.rtx
def test_quantized_and_engine(tmp_path, rtx_plan_bytes, qdq_onnx):
    plan = write_engine(tmp_path / "engines", rtx_plan_bytes, fixture_text("trt10_detailed.json"),
                        {"backend": {"name": "rtx", "version": "1.7.1.116"}, "layers": {"saved": True}})
    state = DemoState(DemoConfig(workdir=tmp_path), onnx=tmp_path / "unused.onnx", quantized=qdq_onnx, engine=plan)
    t0 = time.perf_counter()
    msg, files = demo_stage(state)
    assert time.perf_counter() - t0 < 5
    assert msg.startswith("slice.int8.onnx: 7 of 14 linear/conv/attention nodes behind Q/DQ; engine: ")
    page = files[0].read_text()
    assert "Engine unet.plan" in page and "Q/DQ cross-check" in page and "Per-block precision" in page
