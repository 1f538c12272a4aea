"""The shapes benchmark's modes (issue 18): float references, quantization levels, every Percentile Quant
reduction with SmoothQuant off and on, FP8.

INT8 rows are level 3 (trtkit's INT8 default) unless named; FP8 rows level 4 (attention BMMs too).
"min, first half" is the percentile 0.5 span (the early, high-noise half of the steps); "min, all steps"
is the seed recipe's percentile 1.0 span with the minimum over steps (NVIDIA's blog: the minimum scale
over a percentile of the steps).
"""

from __future__ import annotations

from benchmarks.quality_modes import Mode
from trtkit.calibration.calibrate import Recipe

REDUCTIONS = {  # name -> (percentile, reduction)
    "max": (1.0, "max"),
    "mean": (1.0, "mean"),
    "min, first half": (0.5, "min"),
    "min, all steps": (1.0, "min"),
    "min-mean": (1.0, "min-mean"),
}


def _table() -> list[Mode]:
    rows = [Mode("FP32"), Mode("FP16", dtype="fp16"), Mode("BF16", dtype="bf16")]
    for sq in (False, True):
        for label, (p, red) in REDUCTIONS.items():
            rows.append(Mode(f"INT8 {label}{' + SQ' if sq else ''}",
                             Recipe(precision="int8", level=3.0, percentile=p, reduction=red, smoothquant=sq)))
    rows += [Mode("INT8 level 2.5 mean", Recipe(precision="int8", level=2.5, percentile=1.0, reduction="mean",
                                                smoothquant=False)),
             Mode("INT8 level 2.5 mean + SQ", Recipe(precision="int8", level=2.5, percentile=1.0, reduction="mean",
                                                     smoothquant=True)),
             Mode("FP8 max", Recipe(precision="fp8", level=4.0, percentile=1.0, reduction="max", smoothquant=False)),
             Mode("FP8 mean", Recipe(precision="fp8", level=4.0, percentile=1.0, reduction="mean",
                                     smoothquant=False))]
    return rows


MODES: dict[str, Mode] = {m.name: m for m in _table()}
