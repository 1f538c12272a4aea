"""`trtkit build` as a user meets it: one-line errors, nothing half-written, a cache hit the second time."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest
from builder_cli import one_line_error, run_cli
from builder_models import LINEAR_SHAPES, make_linear
from onnx import helper


@pytest.mark.rtx
def test_build_then_cache_hit(tmp_path: Path) -> None:
    onnx = make_linear(tmp_path / "m.onnx", "fp8")
    out = tmp_path / "engines" / "m.plan"
    args = ("build", str(onnx), "--shapes", LINEAR_SHAPES, "--fp8", "--target-cc", "8.9", "--workspace", "256M",
            "-o", str(out))
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    assert f"built {out}" in p.stdout and "fp8" in p.stdout and "note: the ONNX already has fp8 Q/DQ" in p.stdout
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["settings"]["workspace"] == 256 << 20 and doc["settings"]["opt_level"] == 4
    p = run_cli(*args)
    assert p.returncode == 0 and "up to date" in p.stdout
    p = run_cli(*args, "--force", "--opt-level", "1")
    assert p.returncode == 0 and "built" in p.stdout
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["opt_level"] == 1


@pytest.mark.parametrize("args, needle", [
    (("--profile", "sdxl-2048"), "unknown profile 'sdxl-2048'"),
    (("--shapes", "x:4x64,y:1"), "'y' is not an input of m.onnx"),
    (("--shapes", "x:4x64x2"), "rank 3"),
    (("--int8", "--fp8"), "choose one of --int8 and --fp8, not both"),
    (("--shapes", LINEAR_SHAPES, "--workspace", "lots"), "cannot read size 'lots'"),
    (("--shapes", LINEAR_SHAPES, "--fp8", "--target-cc", "8.6"), "FP8 needs compute capability 8.9"),
    (("--shapes", LINEAR_SHAPES, "--target-cc", "9.0"), "unknown target compute capability"),
    (("--shapes", LINEAR_SHAPES, "--backend", "tvm"), "unknown backend 'tvm'"),
])
def test_errors(tmp_path: Path, args: tuple[str, ...], needle: str) -> None:
    onnx = make_linear(tmp_path / "m.onnx")
    out = tmp_path / "m.plan"
    assert needle in one_line_error(run_cli("build", str(onnx), "-o", str(out), *args))
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.rtx
def test_int8_without_calibration_says_how(tmp_path: Path) -> None:
    onnx = make_linear(tmp_path / "m.onnx")
    line = one_line_error(run_cli("build", str(onnx), "--shapes", LINEAR_SHAPES, "--int8", "-o", str(tmp_path / "m.plan")))
    assert "trtkit calibrate MODEL_DIR -o calib.json" in line
    assert not (tmp_path / "m.plan").exists()


def test_malformed(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_text("not onnx")
    line = one_line_error(run_cli("build", str(tmp_path / "m.onnx"), "--shapes", LINEAR_SHAPES))
    assert "not a readable ONNX model" in line
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.rtx
def test_parser_errors_listed_with_verbose(tmp_path: Path) -> None:
    bad = helper.make_node("NoSuchOp", ["r"], ["y"], name="/unet/custom/NoSuchOp", domain="custom.domain")
    onnx = make_linear(tmp_path / "m.onnx", extra_node=bad)
    p = run_cli("build", str(onnx), "--shapes", LINEAR_SHAPES, "--target-cc", "8.9", "--verbose")
    assert "node /unet/custom/NoSuchOp (NoSuchOp)" in one_line_error(p)
    assert "ONNX parser errors (" in p.stderr
    assert not (tmp_path / "m.plan").exists()


class SigintDuringParse(logging.Filter):
    """Sends this process SIGINT when TensorRT's parser logs the ONNX file name, i.e. inside the parse:
    Python then runs the SIGINT handler inside TensorRT's logger callback, as for a real Ctrl-C."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.sent and record.getMessage().startswith("Input filename:"):
            self.sent += 1
            os.kill(os.getpid(), signal.SIGINT)
        return True


@pytest.mark.parametrize("backend", [pytest.param("rtx", marks=pytest.mark.rtx),
                                     pytest.param("trt", marks=pytest.mark.tensorrt)])
def test_ctrl_c_during_parse_cancels(backend: str, tiny_unet_onnx: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Newcomer trial P4: a Ctrl-C in the parse was swallowed by TensorRT and the plan written (rc 0)."""
    from trtkit.cli import main

    trt_log = logging.getLogger("trtkit.tensorrt")
    hook = SigintDuringParse()
    level = trt_log.level
    trt_log.setLevel(logging.INFO)  # setLevel, not the attribute: it clears the isEnabledFor cache
    trt_log.addFilter(hook)  # before the CLI's own filter, which drops INFO records
    out = tmp_path / "v.plan"
    try:
        rc = main(["build", str(tiny_unet_onnx), "-p", "tiny-256", "--backend", backend, "-o", str(out)]
                  + (["--target-cc", "8.9"] if backend == "rtx" else []))
    finally:
        trt_log.removeFilter(hook)
        trt_log.setLevel(level)
    err = capsys.readouterr().err
    assert hook.sent == 1
    assert rc == 130, err
    # the status lines ("  hashing ...", "  parsing ..."), then one line about the cancel
    assert [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("  ")] == [
        "error: build cancelled (interrupted (Ctrl-C)); no plan written"], err
    assert list(tmp_path.iterdir()) == []  # no plan, no json, no work folder
