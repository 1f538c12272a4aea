"""`trtkit inspect` as a user runs it: tables, --json, --html, compare, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from inspect_helpers import fixture_text, write_engine


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trtkit", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "220"}, timeout=300)


def one_line_error(p: subprocess.CompletedProcess, needle: str) -> None:
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr


@pytest.fixture
def engines(tmp_path, rtx_plan_bytes, qdq_onnx, fp8_onnx) -> tuple[Path, Path]:
    a = write_engine(tmp_path / "a", rtx_plan_bytes, fixture_text("trt10_detailed.json"),
                     {"backend": {"name": "rtx", "version": "1.7.1.116"}, "onnx": {"path": str(qdq_onnx)}})
    b = write_engine(tmp_path / "b", rtx_plan_bytes, fixture_text("trt11_detailed.json"), None)
    return a, b


def test_onnx_json_and_html(qdq_onnx, tmp_path):
    out = tmp_path / "cov.html"
    p = run_cli("inspect", str(qdq_onnx), "--json", "--html", str(out))
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["kind"] == "onnx" and doc["nodes"]["summary"]["conv"] == {"total": 4, "int8": 2}
    assert out.is_file() and "<svg" in out.read_text()


@pytest.mark.rtx
def test_engine_table_and_json(engines):
    a, _ = engines
    p = run_cli("inspect", str(a), "--from-files")
    assert p.returncode == 0, p.stderr
    for needle in ("layers by precision", "share of UNet compute", "fused attention", "Q/DQ cross-check",
                   "unfused Q/DQ", "missing pair", "reformat", "not fused"):
        assert needle in p.stdout, needle
    p = run_cli("inspect", str(a), "--from-files", "--json")
    doc = json.loads(p.stdout)
    assert doc["kind"] == "engine" and doc["source"] == "saved" and len(doc["layers"]) == 18
    assert {c["outcome"] for c in doc["crosscheck"]} == {"8-bit", "fell back", "unknown"}


@pytest.mark.rtx
def test_compare(engines, fp8_onnx):
    a, b = engines
    p = run_cli("inspect", str(a), str(b), "--from-files", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["kind"] == "compare" and sum(not r["same"] for r in doc["rows"]) == 8
    p = run_cli("inspect", str(a), str(b), "--from-files")
    assert "16 compute nodes matched; 8 differ in precision" in p.stdout


@pytest.mark.rtx
def test_bad_inputs_are_one_line(tmp_path, rtx_plan_bytes, qdq_onnx):
    text = tmp_path / "notes.plan"
    text.write_text("not an engine\n")
    one_line_error(run_cli("inspect", str(text)), "is not a TensorRT plan")
    cut = tmp_path / "cut.plan"
    cut.write_bytes(rtx_plan_bytes[:500])
    one_line_error(run_cli("inspect", str(cut)), "is truncated")
    old = bytearray(rtx_plan_bytes)
    old[24:26] = bytes([1, 3])
    other = tmp_path / "other.plan"
    other.write_bytes(bytes(old))
    one_line_error(run_cli("inspect", str(other)), "was built with TensorRT-RTX 1.3")
    one_line_error(run_cli("inspect", str(tmp_path / "missing.plan")), "does not exist")
    one_line_error(run_cli("inspect", str(qdq_onnx), str(qdq_onnx)), "comparing takes two engine plans")
    one_line_error(run_cli("inspect", str(qdq_onnx), "--profile-layers"), "--profile-layers times an engine")
    good = write_engine(tmp_path / "g", rtx_plan_bytes, None, None)
    one_line_error(run_cli("inspect", str(good), "--onnx", str(tmp_path / "nope.onnx")), "--onnx")


def test_html_to_an_unwritable_place(tmp_path, qdq_onnx):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    p = run_cli("inspect", str(qdq_onnx), "--html", str(blocker / "report.html"))
    one_line_error(p, "cannot create output folder")
    assert blocker.read_text() == "x" and not list(tmp_path.glob("**/*.html"))
