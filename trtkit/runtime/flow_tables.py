"""FlowMatchEulerDiscreteScheduler (FLUX.1, SD3.x) as device tables for the loop runner.

A flow-matching Euler step is `x' = x + (sigma_next - sigma) * v` with v the transformer's output (after CFG),
which is the shared affine step of schedulers.py with A=0, B=1 (x0 := v), P=1, Q=dt and an input scale of 1:
the same fused kernel and numpy reference run it, no new device code.

The sigmas are the ones the diffusers pipeline would make for this call: a deep copy of the pipeline's own
scheduler instance (config patches and unset defaults as they are), `set_timesteps` called with exactly the
arguments the pipeline passes:
  * FLUX: sigmas = linspace(1, 1/N, N) (None when the config says use_flow_sigmas) and mu from the packed image
    sequence length through the pipeline module's own `calculate_shift`, read with the pipeline's defaults;
  * SD3: no sigmas; mu only when the config has use_dynamic_shifting (or the call passes one).
Whatever the copy's `set_timesteps` does with them (static `shift`, dynamic shifting, shift_terminal, Karras /
exponential / beta sigmas, invert_sigmas) is read back from its `sigmas`, so it carries over. What step() itself
does differently is refused by `flow_unsupported_reason` with one line.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from trtkit.errors import TrtkitError
from trtkit.runtime.schedulers import ROWS, StepTables

FLOW_CLASS = "FlowMatchEulerDiscreteScheduler"
FAMILY = "flow_euler"


def flow_unsupported_reason(scheduler: Any) -> str | None:
    """Why the tables cannot reproduce `scheduler`'s step() for the DiT pipelines, or None when they can."""
    cls = type(scheduler).__name__
    if cls != FLOW_CLASS:  # exact class: a subclass may override step()
        return f"scheduler {cls} has no device tables for DiT pipelines (supported: {FLOW_CLASS})"
    if scheduler.config.get("stochastic_sampling", False):
        # step() draws fresh noise from torch's global generator (the pipelines pass none): not reproducible
        return f"{cls} stochastic_sampling=True has no device tables (its noise comes from torch's global RNG)"
    return None


def pipeline_timestep_args(kind: str, scheduler: Any, steps: int, image_seq_len: int,
                           sigmas: Any = None, mu: float | None = None) -> dict[str, Any]:
    """The keyword arguments diffusers' `kind` ("flux" / "sd3") pipeline passes to `scheduler.set_timesteps`
    (through retrieve_timesteps) for `steps` steps at `image_seq_len` transformer tokens; `sigmas` / `mu` are
    the call's own arguments (None when the user left them unset)."""
    cfg = scheduler.config
    if kind == "flux":
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(cfg, "use_flow_sigmas", False):  # the pipeline's own `hasattr(config, ...)` test
            sigmas = None
        mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return {"num_inference_steps": steps, "sigmas": sigmas, "mu": mu}
    if kind == "sd3":
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        kw: dict[str, Any] = {"num_inference_steps": steps, "sigmas": sigmas}
        if cfg.get("use_dynamic_shifting", None) and mu is None:
            kw["mu"] = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256),
                                       cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                       cfg.get("max_shift", 1.16))
        elif mu is not None:
            kw["mu"] = mu
        return kw
    raise TrtkitError(f"unknown DiT pipeline kind {kind!r} (flux or sd3)")


def _f64(t: Any) -> np.ndarray:
    return np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t, dtype=np.float64)


def make_flow_tables(scheduler: Any, timestep_args: dict[str, Any]) -> StepTables:
    """Tables of `scheduler` (deep-copied, never mutated) after `set_timesteps(**timestep_args)`, as the pipeline
    will step it. The number of steps is the length of the copy's timesteps (sigmas given: their length)."""
    reason = flow_unsupported_reason(scheduler)
    if reason is not None:
        raise TrtkitError(reason)
    steps = timestep_args.get("num_inference_steps")
    if timestep_args.get("sigmas") is None and (steps is None or steps < 1):
        raise TrtkitError(f"steps must be >= 1, got {steps}")
    sch = copy.deepcopy(scheduler)
    kw = dict(timestep_args)
    if kw.get("sigmas") is not None:  # retrieve_timesteps passes sigmas without num_inference_steps
        kw.pop("num_inference_steps", None)
    try:
        sch.set_timesteps(device="cpu", **kw)
    except ValueError as e:  # e.g. use_dynamic_shifting without mu: diffusers' own words
        raise TrtkitError(f"{FLOW_CLASS}.set_timesteps: {str(e).splitlines()[0]}") from None
    ts = _f64(sch.timesteps)
    sig = _f64(sch.sigmas)
    n = len(ts)
    if n < 1 or len(sig) < n + 1:  # pragma: no cover - diffusers always appends the terminal sigma
        raise TrtkitError(f"{FLOW_CLASS} gave {n} timesteps and {len(sig)} sigmas")
    if np.count_nonzero(ts == ts[0]) > 1:
        # step() starts at the SECOND index of a repeated first timestep where the pipeline sets no begin index
        raise TrtkitError(f"{FLOW_CLASS} timesteps repeat their first value {ts[0]}: no device tables")
    # step() in float32: dt = sigmas[i+1] - sigmas[i]; both float32 numbers, so their difference in float64
    # rounded to float32 is the float32 difference
    s32 = sig.astype(np.float32).astype(np.float64)
    dt = s32[1:n + 1] - s32[:n]
    c = {k: np.zeros(n) for k in ROWS[:9]}
    c["B"], c["P"], c["Q"] = np.ones(n), np.ones(n), dt
    if not np.isfinite(dt).all():
        raise TrtkitError(f"{FLOW_CLASS} gives non-finite sigmas for {n} steps")
    return StepTables(family=FAMILY, timesteps=ts.astype(np.float32),
                      coef={k: v.astype(np.float32) for k, v in c.items()}, in_scale=np.ones(n + 1, np.float32),
                      init_noise_sigma=1.0)  # the DiT pipelines start from unscaled noise


def sigmas_of(scheduler: Any, timestep_args: dict[str, Any]) -> np.ndarray:
    """The sigmas diffusers' copy steps through (for tests and reports)."""
    sch = copy.deepcopy(scheduler)
    kw = dict(timestep_args)
    if kw.get("sigmas") is not None:
        kw.pop("num_inference_steps", None)
    sch.set_timesteps(device="cpu", **kw)
    return _f64(sch.sigmas)
