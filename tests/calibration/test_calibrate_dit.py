"""`trtkit calibrate` on the tiny FLUX.1 and SD3.5 folders, as users run it (the CLI, defaults left unset
but the size): per-step ranges over the flow-matching sigmas, a file `trtkit quantize` takes for every range
of the DiT ONNX, Q/DQ graphs that build with TensorRT-RTX, and the Q/DQ ONNX in onnxruntime equal to
torch fake quantization of the same file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from trtkit import calibfile

STEPS = 3


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trtkit", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def dit_calib(tiny_dit_dir, tmp_path_factory: pytest.TempPathFactory):
    """(family, precision) -> calibration file: the CLI, 2 prompts x 3 steps at 128x128 on the CPU; INT8
    with SmoothQuant at a fixed alpha (the searched default leaves some layers unsmoothed)."""
    made: dict[tuple[str, str], Path] = {}

    def get(family: str, precision: str) -> Path:
        if (family, precision) not in made:
            out = tmp_path_factory.mktemp(f"calib-{family}-{precision}") / "calib.json"
            extra = ["--alpha", "0.8"] if precision == "int8" else []
            p = _cli("calibrate", str(tiny_dit_dir(family)), f"--{precision}", "--num-prompts", "2", "--batch", "1",
                     "--steps", str(STEPS), "--height", "128", "--width", "128", "--device", "cpu", "-o", str(out),
                     *extra)
            assert p.returncode == 0, p.stderr
            assert f"wrote {out}" in p.stdout.replace("\n", "")
            made[(family, precision)] = out
        return made[(family, precision)]

    return get


@pytest.mark.parametrize(("family", "precision"), [("flux", "fp8"), ("sd3", "int8")])
def test_calibrate_dit_file(family: str, precision: str, dit_calib, tiny_dit_dir, tiny_dit_onnx,
                            tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from trtkit.calibration.calibrate import load_for_model
    from trtkit.calibration.hooks_dit import targets
    from trtkit.graph.qdq import QuantizeConfig, quantize
    from trtkit.graph.scales import QMAX

    path = dit_calib(family, precision)
    folder = tiny_dit_dir(family)
    cal = load_for_model(path, folder)  # names and config hash checked against the folder's transformer
    assert cal.precision == precision and cal.model["component"] == "transformer"
    assert cal.run["scheduler"] == "FlowMatchEulerDiscreteScheduler" and cal.run["height"] == 128
    assert cal.settings["steps_recorded"] == STEPS and cal.settings["passes"] == 2
    assert cal.run["negative_prompt"] is (None if family == "flux" else cal.run["negative_prompt"])
    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    tr = cls.from_pretrained(folder / "transformer")
    level = 4.0 if precision == "fp8" else 3.0
    tg = targets(tr, level, precision)
    want = {k for k, v in tg.items() if v != "attention"}
    want |= {f"{k}.{r}" for k, v in tg.items() if v == "attention" for r in calibfile.ATTENTION_INPUTS}
    assert set(cal.activations) == want
    if precision == "int8":  # SmoothQuant on every linear input (fixed alpha), none on attention
        assert set(cal.smooth) == want and set(cal.alphas.values()) == {0.8}
    else:
        assert any(k.endswith(".softmax") for k in cal.activations) and not cal.smooth

    # the Q/DQ pass takes every range from the file, and writes amax/QMAX as the activation scales
    r = quantize(QuantizeConfig(onnx_path=tiny_dit_onnx(family), output=tmp_path / "q.onnx", precision=precision,
                                level=level, calib=path))
    assert r.calibration == "calibration file"
    q = [d for d in r.decisions if d.quantized]
    assert {d.amax_source for d in q} <= {"calibration", "fixed"} and len(q) == len(tg)
    for d in q:
        if d.kind == "linear":
            assert d.amax == pytest.approx(cal.activations[d.module]), d.module
    scales = {float(np.asarray(onnx.numpy_helper.to_array(t)).reshape(-1)[0])
              for t in onnx.load(str(r.path), load_external_data=False).graph.initializer if "scale" in t.name}
    for key, amax in cal.activations.items():
        if key.rsplit(".", 1)[-1] not in calibfile.ATTENTION_INPUTS:
            assert any(abs(s - np.float16(amax / QMAX[precision])) <= 1e-3 * s for s in scales), key


def test_calibrate_dit_refuses_another_model(dit_calib, tiny_dit_onnx, tmp_path: Path) -> None:
    """A FLUX file on the SD3 ONNX: one line, naming a module SD3 lacks (no silent max calibration)."""
    p = _cli("quantize", str(tiny_dit_onnx("sd3")), "--fp8", "--calib", str(dit_calib("flux", "fp8")), "-o",
             str(tmp_path / "x.onnx"))
    errs = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode != 0 and len(errs) == 1 and "calibrated for another model" in errs[0], p.stderr
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.rtx
@pytest.mark.parametrize(("family", "precision"), [("flux", "fp8"), ("sd3", "int8"), ("flux", "int8")])
def test_calibrated_dit_builds_with_rtx(family: str, precision: str, dit_calib, tiny_dit_onnx, tmp_path) -> None:
    from tests.graph.test_rtx_build import ACCEPTED, build
    from trtkit.graph.qdq import QuantizeConfig, quantize
    from trtkit.graph.ranges import sample_feeds

    src = tiny_dit_onnx(family)
    r = quantize(QuantizeConfig(onnx_path=src, output=tmp_path / "q.onnx", precision=precision,
                                level=4.0 if precision == "fp8" else 3.0, calib=dit_calib(family, precision)))
    opt = {k: v.shape for k, v in sample_feeds(onnx.load(str(src)), "tiny-256", 0).items()}
    ok, errors, warnings = build(r.path, opt)
    assert ok, errors
    assert not [w for w in warnings if not any(a.search(w) for a in ACCEPTED)], warnings


@pytest.mark.parametrize(("family", "precision"), [("sd3", "int8"), ("flux", "int8"), ("flux", "fp8")])
def test_qdq_onnx_equals_torch_fakequant(family: str, precision: str, dit_calib, tiny_dit_dir, tiny_dit_onnx,
                                         tmp_path: Path) -> None:
    """The whole transformer, every calibrated input quantized (SmoothQuant on for INT8), FP32 elsewhere:
    onnxruntime on the Q/DQ ONNX vs trtkit's torch fake quantization of the same file."""
    import onnxruntime as ort
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from trtkit.calibration.fakequant import quantized
    from trtkit.graph.qdq import QuantizeConfig, quantize
    from trtkit.graph.ranges import sample_feeds

    path = dit_calib(family, precision)
    src = tiny_dit_onnx(family)
    level = 4.0 if precision == "fp8" else 3.0
    quantize(QuantizeConfig(onnx_path=src, output=tmp_path / "q.onnx", precision=precision, level=level, calib=path,
                            fp16=False))
    feeds = sample_feeds(onnx.load(str(src)), "tiny-256", seed=1)
    opts = ort.SessionOptions()  # Q/DQ as written (see tests/calibration/test_fakequant.py)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    tr = cls.from_pretrained(tiny_dit_dir(family) / "transformer").eval()
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        ref = tr(**t, return_dict=False)[0].numpy()
        with quantized(tr, calibfile.load(path)):
            fq = tr(**t, return_dict=False)[0].numpy()
    err = float(np.linalg.norm(fq - ref) / np.linalg.norm(ref))
    diff = float(np.linalg.norm(got - fq) / np.linalg.norm(ref))
    print(f"\n{family} {precision}: fake-quant error vs FP32 {err:.4f}, ONNX vs fake-quant {diff:.5f}")
    assert err > 1e-4  # really quantized
    assert diff < 0.1 * err, (diff, err)


def test_dit_calibration_header(dit_calib, tiny_dit_dir) -> None:
    doc = json.loads(dit_calib("flux", "fp8").read_text())
    assert doc["model"]["class"] == "FluxTransformer2DModel"
    assert doc["model"]["source"] == str(tiny_dit_dir("flux").resolve())
