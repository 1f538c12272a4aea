"""Percentile Quant: pick an activation's range from its per-step amax table.

Input: `table` [passes, steps], the input's absolute max in calibration pass p at denoising step t
(steps in the order the sampler runs them: the early, high-noise steps first; NaN = not seen).

1. Step range: only the first `n = max(1, int(steps * percentile))` steps are used (percentile 1.0 =
   all steps, 0.5 = the first half). Same `int()` truncation as ModelOpt's PercentileCalibrator.
2. Reduction over that [passes, n] block:

| reduction    | per step, over passes | then over the n steps | ModelOpt collect_method |
|--------------|-----------------------|-----------------------|-------------------------|
| `max`        | max                   | max                   | (plain max calibration) |
| `min`        | max                   | min                   | `min-max`               |
| `mean`       | max                   | mean                  | `mean-max`              |
| `min-mean`   | mean                  | min                   | `min-mean`              |
| `global-min` | min                   | min                   | `global_min`            |

The min-mean divisor: ModelOpt sums a step's amax over passes and divides by the step count
(`total_step`), not by the number of passes, so its result is the per-step mean times
`passes / steps` (0.53x for demoDiffusion's 16 passes x 30 steps): calib size, batch and steps all
change the range. trtkit divides by the number of passes that saw the step (a true mean), so
`min-mean` = the smallest per-step mean amax, independent of how many prompts or steps were used.
"""

from __future__ import annotations

import warnings

import numpy as np

from trtkit.errors import TrtkitError

REDUCTIONS = ("max", "min", "mean", "min-mean", "global-min")


def check(percentile: float, reduction: str) -> None:
    if not 0.0 < percentile <= 1.0:
        raise TrtkitError(f"percentile {percentile} is not in (0, 1]: it is the share of the steps used")
    if reduction not in REDUCTIONS:
        raise TrtkitError(f"reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")


def steps_used(steps: int, percentile: float) -> int:
    return max(1, int(steps * percentile))


def reduce(table: np.ndarray, percentile: float = 1.0, reduction: str = "min-mean") -> float:
    """The activation amax chosen from a [passes, steps] table (see the module docstring)."""
    check(percentile, reduction)
    t = np.asarray(table, dtype=np.float64)
    if t.ndim == 1:
        t = t[None]
    block = t[:, : steps_used(t.shape[1], percentile)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN steps are dropped below
        if reduction == "min-mean":
            per_step = np.nanmean(block, axis=0)
        elif reduction == "global-min":
            per_step = np.nanmin(block, axis=0)
        else:
            per_step = np.nanmax(block, axis=0)
    per_step = per_step[~np.isnan(per_step)]
    if per_step.size == 0:
        raise TrtkitError("no statistics were recorded in the selected steps")
    if reduction in ("max",):
        return float(per_step.max())
    if reduction == "mean":
        return float(per_step.mean())
    return float(per_step.min())
