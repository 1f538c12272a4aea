"""`trtkit calibrate` on a ControlNet pipeline folder: the pipeline runs with the synthetic conditioning image,
and each ControlNet gets its calibration file beside the UNet's, which `trtkit build --int8 --calib` takes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_cli import run_cli

from trtkit.calibration.controlnet import calib_path, conditioning_image


def test_conditioning_image_is_deterministic_edges() -> None:
    a, b = (np.asarray(conditioning_image(64, 96)) for _ in range(2))
    assert a.shape == (64, 96, 3) and np.array_equal(a, b)
    lit = (a[..., 0] > 0).mean()
    assert 0.02 < lit < 0.3  # outlines, not filled shapes nor an empty image


def test_cli_calibrate_controlnet_then_build(tiny_controlnet_dir, tiny_controlnet_onnx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = tiny_controlnet_dir("sdxl")
    out = tmp_path / "calib.json"
    p = run_cli("calibrate", str(folder), "-o", str(out), "--num-prompts", "2", "--steps", "2")
    assert p.returncode == 0, p.stderr
    cn_file = calib_path(out, "controlnet")
    assert out.is_file() and cn_file.is_file() and str(cn_file) in p.stdout
    assert not list(tmp_path.glob("*.partial.npz"))
    cn = json.loads(cn_file.read_text())
    unet = json.loads(out.read_text())
    assert cn["model"]["component"] == "controlnet" and unet["model"]["component"] == "unet"
    acts = cn["activations"]
    # the ControlNet's own modules were observed (the pass keeps the zero convs FP16 by default; --include
    # uses these ranges) and the ranges differ from the UNet's for the shared names
    assert "controlnet_mid_block" in acts and "controlnet_down_blocks.0" in acts
    assert "controlnet_cond_embedding.blocks.0" in acts and "controlnet_cond_embedding.conv_in" not in acts
    shared = sorted(set(acts) & set(unet["activations"]))
    assert shared and any(acts[k]["amax"] != unet["activations"][k]["amax"] for k in shared)

    pytest.importorskip("tensorrt_rtx")
    onnx_path = tiny_controlnet_onnx("sdxl")["controlnet"].path
    p = run_cli("build", str(onnx_path), "--int8", "--calib", str(cn_file), "-p", "tiny-256", "--target-cc", "8.9",
                "-o", str(tmp_path / "controlnet.plan"))
    assert p.returncode == 0, p.stderr
    meta = json.loads((tmp_path / "controlnet.json").read_text())
    assert meta["precision"]["qdq_types"] == ["int8"]
    # the UNet's file on the ControlNet is refused in one line (module names it does not have)
    p = run_cli("quantize", str(onnx_path), "--int8", "--calib", str(out), "-o", str(tmp_path / "wrong.onnx"))
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert len([ln for ln in p.stderr.splitlines() if ln.startswith("error:")]) == 1


def test_multi_controlnet_resume_matches_straight_run(tiny_controlnet_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two ControlNets: interrupted after one prompt batch and resumed, every file equals an uninterrupted run."""
    from trtkit import calibfile
    from trtkit.calibration.calibrate import CalibrateConfig, Recipe, calibrate, partial_path

    folder = tiny_controlnet_dir("sdxl", 2)

    def cfg(out: Path) -> CalibrateConfig:
        return CalibrateConfig(model_dir=folder, out=out, num_prompts=2, steps=2, batch=1, height=64, width=64,
                               device="cpu", sample_rows=32, recipe=Recipe())

    class Interrupt(Exception):
        pass

    def stop_after_first(done: int, total: int, msg: str) -> None:
        if done == 1:
            raise Interrupt

    out = tmp_path / "calib.json"
    with pytest.raises(Interrupt):
        calibrate(cfg(out), progress=stop_after_first)
    names = ("controlnet", "controlnet_1")
    assert all(partial_path(calib_path(out, n)).is_file() for n in names) and not out.exists()
    calls: list[int] = []
    calibrate(cfg(out), progress=lambda d, t, m: calls.append(d))
    assert calls == [1, 2]  # resumed: one batch run, not two
    straight = calibrate(cfg(tmp_path / "straight.json"))
    for n in ("", *names):
        a, b = ((calibfile.load(calib_path(p, n) if n else p)) for p in (out, straight))
        assert a.activations == pytest.approx(b.activations), n
    assert calibfile.load(calib_path(out, "controlnet")).activations != \
        calibfile.load(calib_path(out, "controlnet_1")).activations
    assert not list(tmp_path.glob("*.partial.npz"))
