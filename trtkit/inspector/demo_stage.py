"""Demo stage: Q/DQ coverage of the quantized (or exported) UNet, the engine report where there is an
engine, both on one HTML page in the demo folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def demo_stage(state: Any) -> tuple[str, list[Path]]:
    # The demo prints one line per stage; the full tables go to report.html (and `trtkit inspect`).
    from trtkit._files import write_text_atomic
    from trtkit.demo import Skipped
    from trtkit.inspector.html import combined_html
    from trtkit.inspector.onnx_report import onnx_report
    from trtkit.inspector.report import engine_report

    onnx = state.quantized or state.onnx
    if onnx is None and state.engine is None:
        raise Skipped("no ONNX model or engine from the earlier stages")
    sections: list[tuple[str, Any]] = []
    parts = []
    if onnx is not None:
        rep = onnx_report(onnx)
        sections.append((f"Q/DQ coverage of {Path(onnx).name}", rep))
        s = rep.scan.summary()
        q = sum(d.get("int8", 0) + d.get("fp8", 0) for d in s.values())
        parts.append(f"{Path(onnx).name}: {q} of {sum(d['total'] for d in s.values())} linear/conv/attention "
                     "nodes behind Q/DQ")
    if state.engine is not None:
        erep = engine_report(state.engine, onnx=onnx)
        sections.append((f"Engine {Path(state.engine).name}", erep))
        parts.append(f"engine: {len(erep.layers)} layers ({erep.src.source})" if erep.layers else
                     "engine: metadata only (no layer information on this machine)")
    out = Path(state.config.workdir) / "report.html"
    write_text_atomic(out, combined_html("trtkit demo: inspect", sections))
    return "; ".join(parts), [out]
