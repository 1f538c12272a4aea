"""The HTML page: one self-contained file, and it opens in headless Chromium with no console errors.
Screenshots are kept in tests/inspector/artifacts/ (ignored by git); the test prints their paths."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from inspect_helpers import fixture_text, write_engine

from trtkit.inspector.html import page, render_html, write_html
from trtkit.inspector.report import inspect

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000"]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


def _chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=120)


def open_in_chromium(html_path: Path, screenshot: Path) -> tuple[str, str, list[str]]:
    """(document title after scripts ran, the DOM, console error lines), and a screenshot saved."""
    dom = _chromium("--dump-dom", html_path.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r"<head>.*?<title>(.*?)</title>", dom.stdout, re.S)
    title = m.group(1) if m else ""
    console_errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and
                      re.search(r"Uncaught|Error|error", line)]
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    shot = _chromium(f"--screenshot={screenshot.resolve()}", "--window-size=1400,2000", html_path.resolve().as_uri())
    assert shot.returncode == 0 and screenshot.is_file() and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    print(f"screenshot: {screenshot}")
    return title, dom.stdout, console_errors


@pytest.fixture
def reports(tmp_path, plan_bytes, qdq_onnx, fp8_onnx, tiny_unet_onnx):
    a = write_engine(tmp_path / "a", plan_bytes, fixture_text("trt10_detailed.json"),
                     {"backend": {"name": "rtx", "version": "1.7.1.116"}, "onnx": {"path": str(qdq_onnx)},
                      "precision": {"requested": "int8", "qdq_types": ["int8"]}})
    b = write_engine(tmp_path / "b", plan_bytes, fixture_text("trt11_detailed.json"),
                     {"backend": {"name": "rtx", "version": "1.7.1.116"}, "onnx": {"path": str(fp8_onnx)}})
    onnx = tiny_unet_onnx
    try:  # the real tiny UNet at INT8 level 3, where the Q/DQ pass is there
        from trtkit.graph.qdq import QuantizeConfig, quantize

        onnx = quantize(QuantizeConfig(onnx_path=tiny_unet_onnx, output=tmp_path / "unet.int8.onnx")).path
    except ImportError:
        pass
    return {"engine": inspect(a, from_files=True), "compare": inspect(a, b, from_files=True),
            "onnx": inspect(onnx)}


EXTERNAL = re.compile(r"https?:|\bsrc\s*=|<link\b|@import|url\(|<iframe|<img\b", re.I)


def test_pages_are_self_contained(reports):
    for name, rep in reports.items():
        text = render_html(rep)
        assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
        assert not EXTERNAL.search(text), (name, EXTERNAL.search(text))
    eng = render_html(reports["engine"])
    assert "Per-block precision" in eng and "<svg" in eng and "Q/DQ cross-check" in eng
    assert "fell back" in eng and "unfused Q/DQ" in eng and "not fused" in eng


def test_text_is_escaped():
    from trtkit.inspector.html import table

    assert "<script>" not in table(["h"], [[__import__("html").escape("<script>x</script>")]])


@needs_chromium
def test_opens_in_chromium_without_console_errors(reports, tmp_path):
    for name, rep in reports.items():
        path = write_html(rep, tmp_path / f"{name}.html")
        title, dom, errors = open_in_chromium(path, ARTIFACTS / f"inspect-{name}.png")
        assert not title.startswith("JS-ERROR"), title
        assert errors == [], errors
        assert 'data-ready="1"' in dom  # the page's own script ran


@needs_chromium
def test_chromium_check_catches_a_script_error(tmp_path):
    """The negative control: a page with a broken script is reported by both detectors."""
    bad = tmp_path / "bad.html"
    bad.write_text(page("bad", "<p>x</p><script>notDefined();</script>"))
    title, _, errors = open_in_chromium(bad, tmp_path / "bad.png")
    assert title.startswith("JS-ERROR") and "notDefined" in title
    assert errors and "notDefined" in errors[0]
