"""Torch fake quantization (what the quality benchmark runs) equals the Q/DQ ONNX of the graph pass in
onnxruntime, module by module, for the same calibration file: a conv, a linear, and SmoothQuant-ed linears
(1/s folded into a LayerNorm, and as a Mul)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from trtkit import calibfile
from trtkit.calibration.calibrate import CalibrateConfig, Recipe, calibrate
from trtkit.calibration.fakequant import quantized
from trtkit.calibration.levels import targets

BLK = "down_blocks.1.attentions.0.transformer_blocks.0"


@pytest.fixture(scope="module")
def sq_calib(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fq") / "calib.json"
    return calibrate(CalibrateConfig(model_dir=tiny_model_dir, out=out, num_prompts=1, steps=2, batch=1, height=64,
                                     width=64, device="cpu", recipe=Recipe(alpha=0.8), sample_rows=16))


@pytest.mark.parametrize("module", ["down_blocks.1.resnets.0.conv1", f"{BLK}.attn2.to_v", f"{BLK}.ff.net.0.proj",
                                    f"{BLK}.ff.net.2", f"{BLK}.attn1.to_q"])
def test_fakequant_matches_qdq_onnx(module: str, sq_calib: Path, tiny_model_dir: Path, tiny_unet_onnx: Path,
                                    tmp_path: Path) -> None:
    qdq = pytest.importorskip("trtkit.graph.qdq")
    ort = pytest.importorskip("onnxruntime")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval()
    cal = calibfile.load(sq_calib)
    one = copy.deepcopy(cal)
    one.activations = {module: cal.activations[module]}
    one.smooth = {k: v for k, v in cal.smooth.items() if k == module}
    one.alphas = {k: v for k, v in cal.alphas.items() if k == module}
    assert module.endswith("conv1") or one.smooth  # linears carry a SmoothQuant vector (alpha 0.8)
    path = calibfile.save(one, tmp_path / "one.json")
    others = tuple(k for k in targets(unet, 3.0) if k != module)
    qdq.quantize(qdq.QuantizeConfig(onnx_path=tiny_unet_onnx, output=tmp_path / "one.onnx", calib=path, level=3.0,
                                    fp16=False, exclude=others))

    g = np.random.default_rng(0)
    feeds = {"sample": g.standard_normal((2, 4, 32, 32)).astype(np.float32),
             "timestep": np.array([500.0], np.float32),
             "encoder_hidden_states": g.standard_normal((2, 77, 64)).astype(np.float32),
             "text_embeds": g.standard_normal((2, 32)).astype(np.float32),
             "time_ids": np.array([[256, 256, 0, 0, 256, 256]] * 2, np.float32)}
    # Q/DQ as written: with graph optimizations on, ORT fuses DQ->MatMul into its int8 GEMM, whose u8s8 path
    # on AVX2 CPUs without VNNI saturates 16-bit pair sums (measured here: 0.4x the quantization error itself)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(str(tmp_path / "one.onnx"), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        def run() -> np.ndarray:
            return unet(t["sample"], t["timestep"], encoder_hidden_states=t["encoder_hidden_states"],
                        added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}).sample.numpy()
        ref = run()
        with quantized(unet, one):
            fq = run()
    err = np.linalg.norm(fq - ref) / np.linalg.norm(ref)
    diff = np.linalg.norm(got - fq) / np.linalg.norm(ref)
    assert err > 1e-5  # the module is really quantized
    assert diff < 0.05 * err, (diff, err)  # same quantization, up to a few float-noise rounding flips
