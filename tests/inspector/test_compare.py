"""`inspect A.plan B.plan` without layer information (newcomer trial P8): it printed two empty tables and
"0 compute nodes matched; 0 differ in precision", which reads as "identical"."""

from __future__ import annotations

import io

import pytest
from inspect_helpers import write_engine
from rich.console import Console

from trtkit.inspector.compare import side_by_side
from trtkit.inspector.render import render
from trtkit.inspector.report import inspect


def _meta(precision: str, qdq: list[str], size: int, onnx: str) -> dict:
    return {"backend": {"name": "rtx", "module": "tensorrt_rtx", "version": "1.7.1.116"},
            "target": {"compute_capabilities": ["8.9"]},
            "precision": {"requested": precision, "qdq_types": qdq, "strongly_typed": True, "builder_flags": []},
            "onnx": {"path": onnx}, "plan": {"bytes": size},
            "layers": {"saved": False, "reason": "not saved: tensorrt_rtx cannot deserialize on this machine"}}


def _text(report: object) -> str:
    buf = io.StringIO()
    render(report, Console(file=buf, width=200, highlight=False))
    return buf.getvalue()


@pytest.mark.rtx
def test_no_layer_information_says_so_and_shows_metadata(tmp_path, rtx_plan_bytes):
    n = len(rtx_plan_bytes)
    a = write_engine(tmp_path / "a", rtx_plan_bytes, None, _meta("int8", ["int8"], n, "/x/unet.onnx"))
    b = write_engine(tmp_path / "b", rtx_plan_bytes, None, _meta("fp16", [], n, "/x/unet.onnx"), name="unet.rtx")
    report = inspect(a, b)
    rows = {label: (va, vb, same) for label, va, vb, same in side_by_side(report.a, report.b)}
    assert rows["precision"][0].startswith("int8; Q/DQ types: int8") and rows["precision"][1].startswith("fp16")
    assert rows["precision"][2] is False
    assert rows["backend"] == ("rtx 1.7.1.116", "rtx 1.7.1.116", True)
    text = _text(report)
    assert "0 compute nodes matched" not in text
    assert "nothing to compare layer by layer: A and B have no layer information" in text
    assert "what the metadata says (1 of" in text and "differs" in text
    assert "same plan (identical bytes)" in text  # the same bytes under two names


@pytest.mark.rtx
def test_a_plan_with_itself(tmp_path, rtx_plan_bytes):
    a = write_engine(tmp_path / "a", rtx_plan_bytes, None, _meta("fp16", [], len(rtx_plan_bytes), "/x/u.onnx"))
    text = _text(inspect(a, a))
    assert "same plan (identical bytes)" in text and "(no difference)" in text
    assert "nothing to compare layer by layer: A and B have no layer information" in text
