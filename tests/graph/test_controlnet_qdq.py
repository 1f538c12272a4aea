"""Q/DQ on the tiny ControlNets (trtkit/graph/patterns_controlnet.py): the UNet's levels with the ControlNet's own
exclusions, coverage per block kind, and the error the quantized residuals leave in the UNet's noise_pred."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from test_cli import run_cli

from trtkit.exporter import run_onnxruntime
from trtkit.graph.coverage import coverage
from trtkit.graph.qdq import QuantizeConfig, quantize
from trtkit.graph.ranges import sample_feeds


def _noise_pred_error(files: dict, cn_path: Path) -> float:  # type: ignore[type-arg]
    """max |noise_pred(UNet FP32, residuals of cn_path) - noise_pred(all FP32)| / max |ref|, on inputs of
    another seed than the pass's sample run."""
    cn = files["controlnet"].path
    model = onnx.load(str(cn), load_external_data=False)
    feeds = sample_feeds(model, "tiny-256", seed=7)
    names = [o.name for o in model.graph.output]

    def noise(path: Path) -> np.ndarray:
        res = dict(zip(names, run_onnxruntime(path, feeds), strict=True))
        return run_onnxruntime(files["unet"].path, {**feeds, **res})[0]

    ref = noise(cn)
    return float(np.abs(noise(cn_path) - ref).max() / np.abs(ref).max())


def test_cli_quantize_controlnet_defaults(tiny_controlnet_onnx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`trtkit quantize controlnet.onnx --int8`: the down/mid blocks quantized, the zero convs and the
    conditioning embedding kept (with their reasons), and the UNet's output close to FP32."""
    files = tiny_controlnet_onnx("sdxl")
    out = tmp_path / "controlnet.int8.onnx"
    p = run_cli("quantize", str(files["controlnet"].path), "--int8", "-o", str(out))
    assert p.returncode == 0, p.stderr
    rep = coverage(out)
    blocks = rep.by_block()
    assert blocks["zero convs"]["conv"]["quantized"] == 0 and blocks["zero convs"]["conv"]["total"] == 7
    assert blocks["conditioning embedding"]["conv"]["quantized"] == 0
    assert blocks["conditioning embedding"]["conv"]["total"] == 8
    assert blocks["down_blocks.0"]["conv"]["quantized"] == 5 and blocks["mid_block"]["linear"]["quantized"] > 0
    reasons = {i.module: i.reason for i in rep.items}
    assert "zero conv" in reasons["controlnet_mid_block"] and "zero conv" in reasons["controlnet_down_blocks.3"]
    assert "conditioning embedding" in reasons["controlnet_cond_embedding.blocks.2"]
    assert "zero convs" in p.stdout and "conditioning embedding" in p.stdout  # the CLI's coverage table
    # FP16 elsewhere and INT8 on max ranges of one sample run: measured 0.015 (FP32 rest) on this model
    assert _noise_pred_error(files, out) < 0.05


def test_include_overrides_a_controlnet_exclusion(tiny_controlnet_onnx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = quantize(QuantizeConfig(onnx_path=tiny_controlnet_onnx("sdxl")["controlnet"].path, output=tmp_path / "q.onnx",
                                include=("controlnet_mid_block",)))
    d = {x.module: x for x in r.decisions}
    assert d["controlnet_mid_block"].quantized and d["controlnet_mid_block"].reason.startswith("included by")
    assert not d["controlnet_down_blocks.0"].quantized


@pytest.mark.parametrize("arch,precision", [("sd15", "fp8"), ("sdxl", "int8")])
def test_residual_unet_quantizes(tiny_controlnet_onnx, tmp_path: Path, arch: str, precision: str) -> None:  # type: ignore[no-untyped-def]
    """The residual-input UNet goes through the pass (its sample run feeds the residual inputs at the profile's
    shapes) and keeps the UNet's rules; its output stays close to FP32 with real ControlNet residuals."""
    files = tiny_controlnet_onnx(arch)
    r = quantize(QuantizeConfig(onnx_path=files["unet"].path, output=tmp_path / "u.onnx", precision=precision,
                                fp16=False))
    assert r.counts["conv"]["quantized"] > 20
    assert r.counts["attention"]["quantized"] == (12 if precision == "fp8" else 0)
    model = onnx.load(str(files["controlnet"].path), load_external_data=False)
    feeds = sample_feeds(model, "tiny-256", seed=7)
    res = dict(zip([o.name for o in model.graph.output], run_onnxruntime(files["controlnet"].path, feeds), strict=True))
    ref = run_onnxruntime(files["unet"].path, {**feeds, **res})[0]
    got = run_onnxruntime(r.path, {**feeds, **res})[0]
    assert np.abs(got - ref).max() / np.abs(ref).max() < (0.15 if precision == "fp8" else 0.08)
