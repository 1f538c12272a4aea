"""benchmarks/scale_flux.py at the tiny widths and depth 1/1: every stage runs in its own process and leaves
its row (time, peak RSS, disk, output size) in the JSON and a line in the log, the unquantized export is
deleted after the Q/DQ pass, and a rerun skips what exists. The full-size run is the lead's (GPU machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(work: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/scale_flux.py"), "--tiny", "--layers", "1",
                           "--single-layers", "1", "--trace-tokens", "16", "8", "--workdir", str(work), *extra],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("scale")
    r = _run(work, "--stages", "export,calib,quantize")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return work


def test_stages_leave_rows_and_free_the_export(quantized: Path) -> None:
    doc = json.loads((quantized / "scale.json").read_text())
    rows = doc["stages"]
    assert list(rows) == ["export", "calib", "quantize"] and all(r["ok"] for r in rows.values())
    assert doc["config"]["num_layers"] == 1 and doc["config"]["num_single_layers"] == 1
    for r in rows.values():
        assert r["seconds"] > 0 and r["peak_rss_bytes"] > 10e6 and r["output_bytes"] > 0
    exp, q = rows["export"], rows["quantize"]
    assert exp["dtype"] == "float16" and exp["params"] > 0 and exp["device"] in ("cpu", "cuda")
    assert exp["output_bytes"] >= 2 * exp["params"]  # FP16 weights, all written
    assert q["input_bytes"] == exp["output_bytes"] and q["peak_over_input"] > 0
    assert rows["calib"]["ranges"] > 0
    assert not (quantized / "onnx" / "transformer.onnx").exists()  # the build reads only the Q/DQ ONNX
    assert (quantized / "q" / "transformer.onnx").is_file()
    log = (quantized / "scale.log").read_text()
    assert all(f"{s} ok" in log for s in rows)


def test_rerun_skips_finished_stages(quantized: Path) -> None:
    before = json.loads((quantized / "scale.json").read_text())["stages"]
    r = _run(quantized, "--stages", "export,calib,quantize")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((quantized / "scale.json").read_text())["stages"] == before
    assert (quantized / "scale.log").read_text().count("output exists, skipped") == 3


@pytest.mark.rtx
def test_build_for_sm89_on_the_cpu(quantized: Path) -> None:
    r = _run(quantized, "--stages", "build")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    row = json.loads((quantized / "scale.json").read_text())["stages"]["build"]
    assert row["ok"] and row["output_bytes"] > 0 and "--target-cc 8.9" in row["command"]
    meta = json.loads((quantized / "engine" / "transformer.json").read_text())
    assert "8.9" in json.dumps(meta)
