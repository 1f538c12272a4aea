"""Demo stage: the exported tiny denoiser to Q/DQ in the demo model's precision at its default level (the
UNet INT8 level 3, the FLUX transformer FP8 level 4), with the calibration file if the calibrate stage wrote
one, else max calibration over a sample run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def demo_stage(state: Any) -> tuple[str, list[Path]]:
    from trtkit.demo import Skipped
    from trtkit.graph.qdq import QuantizeConfig, quantize

    m = state.model
    if state.onnx is None:
        raise Skipped(f"no exported {m.label} (the export stage did not run)")
    out = Path(state.config.workdir) / "onnx" / f"{m.component}.{m.precision}.onnx"
    r = quantize(QuantizeConfig(onnx_path=state.onnx, output=out, precision=m.precision, calib=state.calib,
                                profile=state.config.profile, seed=state.config.seed))
    state.quantized = r.path
    c = r.counts
    attn_q = c.get("attention", {}).get("quantized", 0)
    kinds = [f"{c[k]['quantized']}/{c[k]['total']} {k}" for k in ("linear", "conv", "attention")
             if c.get(k, {}).get("total") and (k != "attention" or attn_q)]
    attn = "" if attn_q else ", attention left FP16"
    msg = (f"{m.precision.upper()} level {r.level:g}: {', '.join(kinds)} quantized{attn}; "
           f"ranges from {r.calibration}; rest FP16")
    return msg, [r.path]
