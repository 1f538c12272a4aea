"""Fast per-layer activation ranges of a DiT transformer on the GPU, for the torch FP8 path and benchmarks:
a few prompts through the real pipeline (or given per-step transformer inputs), every linear input the
Q/DQ pass quantizes (trtkit/calibration/hooks_dit.py targets at level 3) tapped with a forward pre-hook.

The range of each input is kept per (pass, step) in one GPU tensor updated in place: no host sync per
call (StepStats reads each amax back, which stalls the GPU once per linear per step). The table is read
back once at the end and reduced by Percentile Quant (trtkit/calibration/percentile.py), so the numbers
mean what `trtkit calibrate --fp8` means; `save_calibration` writes them as a calibration file the Q/DQ
pass takes (`trtkit quantize --calib`), so the torch FP8 model and the ONNX use the same scales.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from trtkit.errors import TrtkitError


class GpuStepAmax:
    """amax[key]: a [passes, steps] tensor on the input's device (-1 = not seen), updated without syncs."""

    def __init__(self, passes: int, steps: int) -> None:
        self.passes, self.steps = passes, steps
        self.pass_index, self.step = 0, 0
        self.amax: dict[str, Any] = {}

    def observe(self, key: str, x: Any) -> Any:
        if not (0 <= self.step < self.steps and 0 <= self.pass_index < self.passes):
            return x
        table = self.amax.get(key)
        if table is None:
            table = self.amax[key] = torch.full((self.passes, self.steps), -1.0, device=x.device)
        p, s = self.pass_index, self.step
        table[p, s] = torch.maximum(table[p, s], x.detach().abs().amax().float())  # stays on the device
        return x

    def tables(self) -> dict[str, Any]:
        """{key: numpy [passes, steps]} with NaN where never seen (one device-to-host copy per key)."""
        import numpy as np

        out = {}
        for k, t in self.amax.items():
            a = t.cpu().numpy().astype(np.float64)
            a[a < 0] = np.nan
            out[k] = a
        return out


def linear_targets(transformer: Any) -> dict[str, str]:
    """Every linear input the DiT Q/DQ pass quantizes at level 3 (and 4): block linears, no embedders/final layer."""
    from trtkit.calibration.hooks_dit import targets

    return {k: v for k, v in targets(transformer, 3.0, "int8").items() if v == "linear"}


def calibrate_transformer_amax(target: Any, prompts: Sequence[str] | None = None, steps: int = 28,
                               inputs: Sequence[Mapping[str, Any]] | None = None, height: int | None = None,
                               width: int | None = None, seed: int = 0, percentile: float = 1.0,
                               reduction: str = "max", pipe_kwargs: Mapping[str, Any] | None = None) -> dict[str, float]:
    """{linear module name: input amax} of a DiT transformer over the flow-matching steps.

    target: a FluxPipeline / StableDiffusion3Pipeline (each prompt runs `steps` steps; default prompts: the
    first two of trtkit's calibration prompts), or the transformer itself with `inputs`, one kwargs dict per
    step (one pass). reduction/percentile: as `trtkit calibrate` (default: max over every step, FP8's).
    The pipeline or transformer is used as it is (device, dtype, attention backend)."""
    from trtkit.calibration import percentile as pq
    from trtkit.calibration.hooks import tapped

    pq.check(percentile, reduction)
    is_pipe = hasattr(target, "transformer")
    transformer = target.transformer if is_pipe else target
    if transformer is None or not hasattr(transformer, "transformer_blocks"):
        raise TrtkitError(f"{type(target).__name__} is not a DiT pipeline or transformer (FLUX.1, SD3.x)")
    tg = linear_targets(transformer)
    if is_pipe:
        from trtkit.calibration.calibrate import read_prompts

        prompt_list = list(prompts) if prompts is not None else read_prompts(None, 2)
        rec = GpuStepAmax(len(prompt_list), steps)
    else:
        if not inputs:
            raise TrtkitError("calibrating a transformer alone needs `inputs`: one kwargs dict per step")
        rec = GpuStepAmax(1, len(inputs))
    with torch.no_grad(), tapped(transformer, tg, rec.observe):
        if is_pipe:
            kw: dict[str, Any] = {"num_inference_steps": steps, "output_type": "latent", **(pipe_kwargs or {})}
            if height is not None:
                kw["height"] = height
            if width is not None:
                kw["width"] = width

            def on_step_end(_p, i, _t, cb):  # type: ignore[no-untyped-def]
                rec.step = i + 1
                return cb

            set_progress = getattr(target, "set_progress_bar_config", None)
            if set_progress is not None:
                set_progress(disable=True)
            for p, prompt in enumerate(prompt_list):
                rec.pass_index, rec.step = p, 0
                gen = torch.Generator(device="cpu").manual_seed(seed + p)
                target(prompt=[prompt], generator=gen, callback_on_step_end=on_step_end, **kw)
        else:
            for i, step_inputs in enumerate(inputs or ()):
                rec.step = i
                transformer(**step_inputs, return_dict=False)
    out: dict[str, float] = {}
    for key, table in rec.tables().items():
        a = pq.reduce(table, percentile, reduction)
        if a > 0:  # an input that is identically zero has no range (calibrate.py leaves it out too)
            out[key] = a
    return out


def save_calibration(amax: Mapping[str, float], path: Path | str, transformer: Any,
                     run: Mapping[str, Any] | None = None, source: str | None = None) -> Path:
    """Write `amax` as an FP8 calibration file (linear inputs; the Q/DQ pass measures attention itself)."""
    import json

    from trtkit import calibfile

    model: dict[str, Any] = {"class": type(transformer).__name__, "component": "transformer"}
    if source:
        model["source"] = source
    cfg = getattr(transformer, "config", None)
    if cfg is not None:
        model["config_hash"] = calibfile.unet_config_hash(json.loads(json.dumps(dict(cfg), default=str)))
    cal = calibfile.Calibration(precision="fp8", activations=dict(amax), model=model, run=dict(run or {}),
                                settings={"method": "percentile", "reduction": "max", "level": 3.0,
                                          "recorder": "trtkit.calibration.dit_amax (GPU)"})
    return calibfile.save(cal, path)
