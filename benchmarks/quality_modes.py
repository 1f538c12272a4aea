"""Precision modes of the quality benchmarks (digits/, shapes/) and their calibration glue.

A mode is FP32, a float dtype (the UNet cast with `.to(dtype)`, as a TensorRT FP16 engine keeps its
weights), or a trtkit `Recipe`. Recipe modes run torch fake quantization (trtkit.calibration.fakequant)
from a calibration file that trtkit's own code builds: the targets `calibrate.recorder` picks for the
recipe, `StepStats` per-step statistics, `build_calibration` (Percentile Quant, SmoothQuant), written and
re-read through `trtkit.calibfile`, i.e. the code paths of `trtkit calibrate` without its pipeline loop
(the benchmarks drive their own samplers). One recording over the level-4 targets (a superset of every
mode's) serves all modes; each mode reduces its own part of it.

Import from a benchmark script with `sys.path.insert(0, <benchmarks/>)` (benchmarks/ is no package).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from trtkit import calibfile
from trtkit.calibfile import ATTENTION_INPUTS, Calibration
from trtkit.calibration import fakequant, levels
from trtkit.calibration.calibrate import Recipe, build_calibration, recorder
from trtkit.calibration.hooks import tapped
from trtkit.calibration.stats import StepStats

FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Mode:
    name: str
    recipe: Recipe | None = None  # fake quantization with this recipe
    dtype: str | None = None  # "fp16" | "bf16": the UNet cast to it; None with a recipe, or FP32

    @property
    def is_reference(self) -> bool:
        return self.recipe is None and self.dtype is None

    def describe(self) -> dict[str, Any]:
        if self.recipe is None:
            return {"kind": self.dtype or "fp32"}
        return {"kind": "fake-quant", "recipe": asdict(self.recipe.resolved())}


def file_name(mode_name: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in mode_name)


def record_stats(unet: torch.nn.Module, steps: int, run_passes: Callable[[StepStats], None],
                 sample_rows: int = 128, seed: int = 0) -> StepStats:
    """Record the level-4 targets while `run_passes(stats)` runs the calibration sampler; it calls
    `stats.begin_pass()` before each pass and sets `stats.step` before each denoising step."""
    targets = levels.targets(unet, 4.0)
    linear = {k for k, v in targets.items() if v == "linear"}
    stats = StepStats(steps, linear, sample_rows=sample_rows, seed=seed)
    with torch.no_grad(), tapped(unet, targets, stats.observe):
        run_passes(stats)
    return stats


def restrict(stats: StepStats, keys: set[str]) -> StepStats:
    """The part of a recording with these keys."""
    out = StepStats(stats.steps, stats.channel_keys & keys, stats.sample_rows)
    out.passes = stats.passes
    out.amax = {k: v for k, v in stats.amax.items() if k in keys}
    out.chan = {k: v for k, v in stats.chan.items() if k in keys}
    out.sample = {k: v for k, v in stats.sample.items() if k in keys}
    return out


def recipe_keys(stats: StepStats, unet: torch.nn.Module, recipe: Recipe) -> set[str]:
    """The recorded keys `trtkit calibrate` would record for this recipe (its `recorder` targets)."""
    _, targets = recorder(unet, recipe, stats.steps)
    attention = {k for k, v in targets.items() if v == "attention"}
    out = set()
    for k in stats.amax:
        base, _, last = k.rpartition(".")
        if (k in targets and k not in attention) or (last in ATTENTION_INPUTS and base in attention):
            out.add(k)
    return out


def calibration(stats: StepStats, unet: Any, recipe: Recipe, path: Path, run: dict[str, Any] | None = None,
                model_info: dict[str, Any] | None = None) -> Calibration:
    """Reduce the recording for `recipe`, write the calibration file to `path` and read it back.
    `model_info`: the file's `model` entry (default: no config hash, so any exported UNet accepts it)."""
    r = recipe.resolved()
    info = model_info or {"source": "benchmark", "class": type(unet).__name__, "component": "unet"}
    cal = build_calibration(restrict(stats, recipe_keys(stats, unet, r)), unet, r, info, run)
    cal.settings["recipe"] = asdict(r)
    calibfile.save(cal, path)
    return calibfile.load(path)


def calibration_info(cal: Calibration) -> dict[str, Any]:
    alphas = list(cal.alphas.values())
    return {"inputs": len(cal.activations), "smoothed": len(cal.smooth),
            "alphas": {str(a): alphas.count(a) for a in sorted(set(alphas))}}


@contextlib.contextmanager
def running(unet: torch.nn.Module, mode: Mode, cal: Calibration | None = None
            ) -> Iterator[tuple[torch.nn.Module, torch.dtype]]:
    """(model, input dtype) to sample `mode` with inside the block."""
    if mode.dtype is not None:
        dtype = FLOAT_DTYPES[mode.dtype]
        yield copy.deepcopy(unet).to(dtype), dtype
    elif mode.recipe is not None:
        assert cal is not None, f"{mode.name} needs its calibration"
        with fakequant.quantized(unet, cal):
            yield unet, torch.float32
    else:
        yield unet, torch.float32
