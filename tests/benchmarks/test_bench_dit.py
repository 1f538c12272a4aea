"""benchmarks/bench_dit.py runs on the CPU at the tiny size (the GPU run is the lead's, at full size): every row
is timed, the accelerated loop gives diffusers' latents, and the JSON holds what the report reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_tiny_cpu_run_writes_rows(model: str, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_dit.py"), "--model", model, "--size", "tiny",
                        "--device", "cpu", "--no-compile", "--steps", "2", "--repeats", "1", "--fp8", "auto",
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["rows"]) >= {"diffusers", "trtkit graph"}
    assert res["rel_err_vs_diffusers"]["trtkit graph"] < 1e-5
    assert res["steps"] == 2 and res["rows"]["trtkit graph"]["median_ms"] > 0
    assert res["fp8"].startswith("skipped")  # the CPU calibrates the ranges only, or has no trtkit.runtime.fp8
    assert res["fp8_calibrate_s"] > 0
