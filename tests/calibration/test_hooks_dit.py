"""Calibration taps on the tiny FLUX and SD3 transformers (trtkit/calibration/hooks_dit.py): the same
inputs the graph pass quantizes, per-step ranges over the flow-matching steps of the real diffusers
pipeline, transparent taps, and a calibration file the Q/DQ pass takes for every range."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trtkit.calibration.hooks_dit import tapped_dit, targets
from trtkit.calibration.stats import StepStats

STEPS = 3


def _pipe(family: str, folder: Path):  # type: ignore[no-untyped-def]
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    pipe = (FluxPipeline if family == "flux" else StableDiffusion3Pipeline).from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dit_calibration_taps(family: str, tiny_dit_dir, tiny_dit_onnx, tmp_path: Path) -> None:
    from trtkit import calibfile
    from trtkit.calibration.calibrate import Recipe, build_calibration
    from trtkit.exporter import run_onnxruntime
    from trtkit.graph.qdq import QuantizeConfig, quantize

    pipe = _pipe(family, tiny_dit_dir(family))
    tr = pipe.transformer
    tg = targets(tr, 4.0, "fp8")
    # one rule: the inputs tapped are the ones the graph pass quantizes at FP8 level 4
    r0 = quantize(QuantizeConfig(onnx_path=tiny_dit_onnx(family), output=tmp_path / "max.onnx", precision="fp8",
                                 level=4.0))
    assert set(tg) == {d.module for d in r0.decisions if d.quantized}

    # 2 images per prompt, non-square, as users run it; the taps must not change the result
    kw = dict(prompt=["a red cube"], num_images_per_prompt=2, height=128, width=192, num_inference_steps=STEPS,
              output_type="latent")
    if family == "flux":
        kw["max_sequence_length"] = 64
    with torch.no_grad():
        ref = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    stats = StepStats(STEPS)

    def on_step_end(_p, i, _t, cb):  # type: ignore[no-untyped-def]
        stats.step = i + 1
        return cb

    with torch.no_grad(), tapped_dit(tr, tg, stats.observe):
        stats.begin_pass()
        got = pipe(generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end, **kw).images
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())  # explicit BMMs = the fused kernel
    attn = [k for k, v in tg.items() if v == "attention"]
    assert attn and set(stats.amax) == {k for k, v in tg.items() if v != "attention"} | {
        f"{a}.{r}" for a in attn for r in ("q_bmm", "k_bmm", "v_bmm", "softmax")}
    for key, table in stats.amax.items():  # one pass, a range at every flow-matching step
        assert table.shape == (1, STEPS) and np.all(np.isfinite(table)) and np.all(table > 0), key
    assert np.all(stats.amax[f"{attn[0]}.softmax"] <= 1.0)

    # the file the calibration writes: the Q/DQ pass takes every range from it
    cal = build_calibration(stats, tr, Recipe(precision="fp8"), {"component": "transformer"}, {"steps": STEPS})
    path = calibfile.save(cal, tmp_path / "calib.json")
    r = quantize(QuantizeConfig(onnx_path=tiny_dit_onnx(family), output=tmp_path / "cal.onnx", precision="fp8",
                                level=4.0, calib=path))
    assert r.calibration == "calibration file"
    assert all(d.amax_source in ("calibration", "fixed") for d in r.decisions if d.quantized)
    import onnx

    from trtkit.graph.ranges import sample_feeds

    feeds = sample_feeds(onnx.load(str(tiny_dit_onnx(family))), "tiny-256", seed=1)
    ref_out = run_onnxruntime(tiny_dit_onnx(family), feeds)[0]
    err = float(np.max(np.abs(run_onnxruntime(r.path, feeds)[0] - ref_out)) / np.max(np.abs(ref_out)))
    assert err < 0.05, err  # ranges from a 128x192 pipeline run, applied at 256x256
