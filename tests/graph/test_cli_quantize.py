"""`trtkit quantize` as a user runs it, and the demo stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import onnx


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trtkit", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})


def test_quantize_cli(tmp_path: Path, tiny_unet_onnx: Path) -> None:
    out = tmp_path / "q.onnx"
    p = run_cli("quantize", str(tiny_unet_onnx), "--fp8", "--exclude", "attn2", "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert "FP8 level 4: 78/148 linear, 26/35 conv, 12/24 attention quantized" in p.stdout
    assert "excluded by --exclude attn2" in p.stdout
    onnx.checker.check_model(str(out))
    p = run_cli("quantize", str(tiny_unet_onnx), "--int8", "--level", "2", "--no-fp16", "--json", "-o", str(out))
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["counts"]["linear"] == {"quantized": 24, "total": 148} and doc["level"] == 2.0


def test_quantize_cli_errors(tmp_path: Path, tiny_unet_onnx: Path) -> None:
    out = tmp_path / "q.onnx"
    for args, needle in ((["--int8", "--fp8"], "choose one of --int8 and --fp8, not both"),
                         (["--int8", "--level", "7"], "not one of"),
                         (["--int8", "--calib", str(tmp_path / "none.json")], "does not exist")):
        p = run_cli("quantize", str(tiny_unet_onnx), *args, "-o", str(out))
        assert p.returncode == 2
        errs = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert len(errs) == 1 and needle in errs[0] and "Traceback" not in p.stderr
    assert not out.exists()


def test_quantize_cli_pattern_matching_nothing(tmp_path: Path, tiny_unet_onnx: Path) -> None:
    """Newcomer trial (issue 13): `--exclude atn1` (a typo of attn1) matched nothing and said nothing, so
    the attention projections meant to stay FP16 were quantized. Now one line, before any work."""
    out = tmp_path / "q.onnx"
    for args, needle in ((["--exclude", "atn1"], "--exclude 'atn1' matches no quantizable module; did you mean 'attn1'?"),
                         (["--exclude", "nomatch*", "--include", "conv_in"], "--exclude 'nomatch*' matches no"),
                         (["--include", "down_blocks.9*"], "--include 'down_blocks.9*' matches no")):
        p = run_cli("quantize", str(tiny_unet_onnx), "--int8", *args, "-o", str(out))
        assert p.returncode == 2, p.stdout
        errs = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert len(errs) == 1 and needle in errs[0] and "Traceback" not in p.stderr, p.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_demo_stage(tmp_path: Path, tiny_unet_onnx: Path) -> None:
    from trtkit.demo import DemoConfig, DemoState
    from trtkit.graph.demo_stage import demo_stage

    state = DemoState(DemoConfig(workdir=tmp_path / "demo"), onnx=tiny_unet_onnx)
    t0 = time.perf_counter()
    msg, files = demo_stage(state)
    assert time.perf_counter() - t0 < 15
    assert state.quantized == tmp_path / "demo" / "onnx" / "unet.int8.onnx" == files[0]
    assert "126/148 linear, 26/35 conv" in msg
