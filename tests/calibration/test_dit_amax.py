"""The fast DiT range recorder (trtkit/calibration/dit_amax.py) on the tiny FLUX pipeline, on the CPU: the
same ranges as `trtkit calibrate`'s recorder (StepStats + Percentile Quant, max), and a file the Q/DQ pass
and the folder check take."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trtkit.calibration.dit_amax import calibrate_transformer_amax, linear_targets, save_calibration

STEPS = 2
KW = {"height": 128, "width": 128, "pipe_kwargs": {"max_sequence_length": 64}}


@pytest.fixture(scope="module")
def flux_pipe(tiny_dit_dir):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(tiny_dit_dir("flux")))


def test_matches_the_calibrate_recorder(flux_pipe) -> None:
    from trtkit.calibration.hooks import tapped
    from trtkit.calibration.percentile import reduce
    from trtkit.calibration.stats import StepStats

    tr = flux_pipe.transformer
    prompts = ["a red cube", "a blue sphere"]
    fast = calibrate_transformer_amax(flux_pipe, prompts, steps=STEPS, **KW)
    tg = linear_targets(tr)
    assert set(fast) == set(tg) and len(tg) == 26  # the tiny FLUX's block linears, no embedders/final layer
    assert not any(k.startswith(("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out"))
                   for k in fast)
    stats = StepStats(STEPS)

    def on_step_end(_p, i, _t, cb):  # type: ignore[no-untyped-def]
        stats.step = i + 1
        return cb

    with torch.no_grad(), tapped(tr, tg, stats.observe):
        for p, prompt in enumerate(prompts):
            stats.begin_pass()
            flux_pipe(prompt=[prompt], generator=torch.Generator().manual_seed(p), num_inference_steps=STEPS,
                      output_type="latent", callback_on_step_end=on_step_end, height=128, width=128,
                      max_sequence_length=64)
    for k, table in stats.amax.items():
        assert table.shape == (2, STEPS)
        assert fast[k] == pytest.approx(reduce(table, 1.0, "max"), rel=1e-6), k


def test_transformer_inputs_and_file(flux_pipe, tiny_dit_dir, tiny_dit_onnx, tmp_path: Path) -> None:
    from trtkit.calibration.calibrate import load_for_model
    from trtkit.graph.qdq import QuantizeConfig, quantize

    tr = flux_pipe.transformer
    g = torch.Generator().manual_seed(0)
    S, T = 64, 16
    inputs = [dict(hidden_states=torch.randn(1, S, 16, generator=g), encoder_hidden_states=torch.randn(1, T, 32, generator=g),
                   pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([s]),
                   guidance=torch.tensor([3.5]), img_ids=torch.zeros(S, 3), txt_ids=torch.zeros(T, 3))
              for s in (1.0, 0.5)]
    amax = calibrate_transformer_amax(tr, inputs=inputs)
    assert len(amax) == 26 and all(v > 0 for v in amax.values())
    path = save_calibration(amax, tmp_path / "fp8.json", tr, run={"steps": 2})
    load_for_model(path, tiny_dit_dir("flux"))  # names and config hash of the in-memory model = the folder's
    r = quantize(QuantizeConfig(onnx_path=tiny_dit_onnx("flux"), output=tmp_path / "q.onnx", precision="fp8",
                                calib=path))
    d = {x.module: x for x in r.decisions}
    for k, v in amax.items():
        assert d[k].amax == pytest.approx(v) and d[k].amax_source == "calibration", k


def test_refuses_a_unet() -> None:
    from trtkit.errors import TrtkitError

    with pytest.raises(TrtkitError, match="not a DiT"):
        calibrate_transformer_amax(torch.nn.Linear(2, 2), inputs=[{}])
