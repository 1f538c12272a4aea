"""The engine header in the terminal and the HTML page where there is no layer information (newcomer trial
P11: it read "layer information from none (-, -)")."""

from __future__ import annotations

import io

import pytest
from inspect_helpers import write_engine
from rich.console import Console

from trtkit.inspector.html import render_html
from trtkit.inspector.render import render
from trtkit.inspector.report import inspect


@pytest.mark.rtx
def test_no_layer_information_header(tmp_path, rtx_plan_bytes):
    meta = {"backend": {"name": "rtx", "version": "1.7.1.116"},
            "precision": {"requested": "fp32", "engine": "int8", "qdq_types": ["int8"]},
            "layers": {"saved": False, "reason": "not saved: tensorrt_rtx cannot deserialize on this machine"}}
    report = inspect(write_engine(tmp_path, rtx_plan_bytes, None, meta))
    buf = io.StringIO()
    render(report, Console(file=buf, width=200, highlight=False))
    text = buf.getvalue()
    assert "no layer information (see the notes)" in text and "layers from: none" not in text
    assert "precision int8 (Q/DQ int8)" in text and "int8 (requested fp32); Q/DQ types: int8" in text
    page = render_html(report)
    assert "<b>no layer information</b> (see the notes)" in page and "none</b> (-, -)" not in page
    assert "<th></th><th></th>" not in page
