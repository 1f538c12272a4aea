"""The shapes quality benchmark end to end on untrained tiny models (CPU): every kind of mode runs through
trtkit's calibration and fake quantization, the JSON has every number with its standard error, and the
report and the defaults picker read it. The measurement itself is a GPU script (benchmarks/shapes/bench.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODES = "FP16;INT8 mean + SQ;INT8 min, first half;FP8 max"


def run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shapes" / script), *args], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    run("bench.py", "--untrained", "--samples", "64", "--device", "cpu", "--steps", "2", "--calib-captions", "2",
        "--boot", "10", "--threads", "1", "--modes", MODES, "--out", str(out))
    return out


def test_smoke_run_report_and_defaults(bench_out: Path) -> None:
    tmp_path = bench_out
    doc = json.loads((tmp_path / "results.json").read_text())
    res = doc["results"]
    assert list(res) == ["FP32", *MODES.split(";")]
    for name, r in res.items():
        for attr in ("colour_a", "shape_a", "colour_b", "shape_b", "axis", "all"):
            a = r["accuracy"][attr]
            assert a["n"] == 64 and 0 <= a["acc"] <= 1 and math.isclose(a["se"], math.sqrt(a["acc"] * (1 - a["acc"]) / 64))
        assert r["frechet"] > 0 and r["frechet_se"] > 0
        if name != "FP32":
            assert r["psnr_se"] > 0 and 0 < r["ssim"] <= 1
    # same seeds: FP16 is far closer to FP32 than 8-bit fake quantization is
    assert res["FP16"]["psnr"] > res["INT8 mean + SQ"]["psnr"] + 5
    assert res["FP32"]["acc_diff"] == 0
    # calibration files through trtkit.calibfile: INT8 level 3 (convs + linears), FP8 level 4 (+ attention BMMs)
    int8 = json.loads((tmp_path / "calib_INT8_mean___SQ.json").read_text())
    fp8 = json.loads((tmp_path / "calib_FP8_max.json").read_text())
    assert int8["settings"]["reduction"] == "mean" and int8["settings"]["smoothquant"] and int8["smoothquant"]
    assert fp8["precision"] == "fp8" and any(k.endswith(".softmax") for k in fp8["activations"])
    assert not any(k.endswith(".softmax") for k in int8["activations"])
    assert res["INT8 min, first half"]["recipe"]["percentile"] == 0.5
    table = run("report.py", str(tmp_path / "results.json"))
    assert table.count("\n| ") >= 2 * len(res) and "Fréchet" in table
    picks = run("defaults.py", str(tmp_path / "results.json"))
    assert "INT8" in picks and "trtkit/calibration/calibrate.py" in picks


@pytest.mark.slow
def test_qdq_crosscheck_agrees_with_fake_quant(bench_out: Path) -> None:
    """The bench's calibration files through trtkit's exporter and Q/DQ pass into onnxruntime: the same
    inputs and ranges as fake quantization, and an error of the same size against FP32."""
    out = run("qdq_crosscheck.py", "--untrained", "--calib-dir", str(bench_out), "--images", "2", "--steps", "2",
              "--modes", "INT8 mean + SQ;FP8 max")
    doc = json.loads((bench_out / "qdq_crosscheck.json").read_text())
    for name, r in doc["modes"].items():
        assert r["pass"], (name, out)
        assert r["qdq_pairs"] > 0 and r["calibration_source"].startswith("calibration")


@pytest.mark.slow
def test_qdq_layers_fake_and_onnx_agree_on_the_same_inputs(bench_out: Path) -> None:
    """Layer by layer on the same tensors (onnxruntime's), fake quantization and the Q/DQ graph are the same
    arithmetic: the same weights after quantization, the same smoothing, the same rounding (up to float ties)
    in every activation quantizer (attention BMM inputs included for FP8), the same op outputs."""
    out = bench_out / "layers.json"
    run("qdq_layers.py", "--untrained", "--calib-dir", str(bench_out), "--modes", "INT8 mean + SQ;FP8 max",
        "--out", str(out))
    doc = json.loads(out.read_text())
    for name, m in doc["modes"].items():
        s = m["summary"]
        assert s["layers"] > 0 and s["max_weight_rel"] == 0, (name, s)
        assert s["max_quantizer_differ"] < 1e-3 and s["max_smooth_rel"] < 1e-5 and s["max_op_rel"] < 1e-5, (name, s)
        assert 1 - 1e-6 < s["scale_vs_amax_range"][0] <= s["scale_vs_amax_range"][1] < 1 + 1e-6, (name, s)
    assert doc["modes"]["FP8 max"]["summary"]["attention_inputs"] > 0
    assert doc["modes"]["FP8 max"]["summary"]["max_attention_quantizer_differ"] < 1e-3
    assert any(r.get("smoothing") in ("Mul", "LayerNorm") for r in doc["modes"]["INT8 mean + SQ"]["layers"].values())
