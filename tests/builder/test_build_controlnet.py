"""TensorRT-RTX builds (CPU, ahead of time for SM 8.9) of the tiny SD 1.5 and SDXL ControlNets and of their
residual-input UNets, FP16, INT8 and FP8 (level 4), from the exported FP32 ONNX as `trtkit build` takes it:
the profile name alone gives every input its shapes (the conditioning image at the image size, the
residuals from the export's metadata). The 8-bit builds take `trtkit quantize`'s output (ControlNet rules, max
ranges of a sample run), as a user without a calibration file does."""

from __future__ import annotations

import json

import pytest

from trtkit.profiles_controlnet import COND, MID

pytestmark = pytest.mark.rtx


# A pairwise cover of arch x component x precision (6 builds, each pair of values at least once) rather than
# the full 12: the builds dominate CI time, and no failure seen here depended on all three at once.
@pytest.mark.parametrize(("arch", "component", "precision"), [
    ("sd15", "controlnet", "fp16"), ("sd15", "unet", "int8"), ("sd15", "controlnet", "fp8"),
    ("sdxl", "unet", "fp16"), ("sdxl", "controlnet", "int8"), ("sdxl", "unet", "fp8"),
])
def test_controlnet_and_residual_unet_build(tiny_controlnet_onnx, tmp_path, arch: str, component: str,
                                            precision: str) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tensorrt_rtx")
    from trtkit.builder.build import build
    from trtkit.builder.config import BuildConfig
    from trtkit.graph.qdq import QuantizeConfig, quantize

    src = tiny_controlnet_onnx(arch)[component].path
    if precision != "fp16":
        src = quantize(QuantizeConfig(onnx_path=src, output=tmp_path / f"{component}.{precision}.onnx",
                                      precision=precision)).path
    r = build(BuildConfig(onnx=src, output=tmp_path / f"{component}.plan", profiles=("tiny-256",), target_cc=("8.9",),
                          precision=precision, opt_level=0, progress=False, save_layers=False))
    assert r.plan.stat().st_size > 0 and r.precision == precision
    meta = json.loads(r.metadata.read_text())
    shapes = meta["profiles"][0]["shapes"]
    ins = [i["name"] for i in meta["io"]["inputs"]]
    outs = [o["name"] for o in meta["io"]["outputs"]]
    if component == "controlnet":
        assert shapes[COND] == {"min": [2, 3, 256, 256], "opt": [2, 3, 256, 256], "max": [8, 3, 256, 256]}
        assert outs[-1] == MID and len(outs) == 7
    else:
        assert ins[-1] == MID and shapes[MID]["opt"] == [2, 64, 16, 16]
        assert shapes["down_block_res_samples_0"]["max"] == [8, 32, 32, 32]
    if precision != "fp16":
        assert meta["precision"]["qdq_types"] == [precision]
