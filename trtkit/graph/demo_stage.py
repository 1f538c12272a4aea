"""Demo stage: the exported tiny UNet to INT8 Q/DQ (level 3), with the calibration file if the
calibrate stage wrote one, else max calibration over a sample run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def demo_stage(state: Any) -> tuple[str, list[Path]]:
    from trtkit.demo import Skipped
    from trtkit.graph.qdq import QuantizeConfig, quantize

    if state.onnx is None:
        raise Skipped("no exported UNet (the export stage did not run)")
    out = Path(state.config.workdir) / "onnx" / "unet.int8.onnx"
    r = quantize(QuantizeConfig(onnx_path=state.onnx, output=out, precision="int8", calib=state.calib, level=3.0,
                                profile=state.config.profile, seed=state.config.seed))
    state.quantized = r.path
    c = r.counts
    msg = (f"INT8 level 3: {c['linear']['quantized']}/{c['linear']['total']} linear, "
           f"{c['conv']['quantized']}/{c['conv']['total']} conv quantized, attention left FP16; "
           f"ranges from {r.calibration}; rest FP16")
    return msg, [r.path]
