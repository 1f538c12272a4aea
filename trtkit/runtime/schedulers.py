"""Schedulers as per-step tables, so that a whole denoising loop can run on the device.

diffusers' `step()` keeps host-side state (step index, previous model outputs) and cannot live
inside a CUDA graph. Every scheduler supported here is, per step, an affine map of a few tensors:

    m   = u + g * (c - u)                      guidance combine (m = c without guidance)
    x0  = A x + B m          [clamped to +-clip where the scheduler clips]
    eps = C x + D m          (DDIM only)
    x'  = P x + Q x0 + E eps + R x0_prev + S noise_i
    x0_prev <- x0            (DPM-Solver++ 2M only)
    model input of the next step = x' * in_scale[i+1]

The coefficients are computed here from the diffusers scheduler's own `set_timesteps` arrays
(sigmas, timesteps, alphas_cumprod), so spacing, Karras sigmas and final-sigma options carry over.
They come from a deep copy of the very instance the pipeline runs, never from a re-read of its config:
diffusers pipelines patch their scheduler's config in place (clip_sample, steps_offset) and `from_config`
would put back the class defaults for every key the user left unset. What the tables cannot reproduce
exactly is named by `unsupported_reason`, so that callers fall back or refuse instead of drawing a
different image. `reference_step` is the numpy version of the math the fused CUDA kernel runs (kernels.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trtkit.errors import TrtkitError

# our name -> diffusers class name
SCHEDULERS: dict[str, str] = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}
CLASS_TO_NAME = {v: k for k, v in SCHEDULERS.items()}

# Row order of the packed device table (kernels.py reads rows by these indices).
ROWS = ("A", "B", "C", "D", "P", "Q", "E", "R", "S", "in_scale", "timestep")
ROW = {name: i for i, name in enumerate(ROWS)}


@dataclass(frozen=True)
class StepTables:
    """Per-step coefficients of one scheduler for one number of steps (see the module docstring)."""

    family: str
    timesteps: np.ndarray  # (N,) float32, the UNet's timestep per step
    coef: dict[str, np.ndarray] = field(repr=False)  # each (N,) float32
    in_scale: np.ndarray = field(repr=False)  # (N+1,) float32; the last entry is the input scale after the loop (1)
    init_noise_sigma: float = 1.0
    clip: float = 0.0  # 0: no clamp of x0
    uses_eps: bool = False
    uses_prev: bool = False
    uses_noise: bool = False

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    def packed(self) -> np.ndarray:
        """(len(ROWS), N+1) float32: what is uploaded once to the device; column N pads the last step."""
        n = self.steps
        out = np.zeros((len(ROWS), n + 1), np.float32)
        for name in ROWS[:9]:
            out[ROW[name], :n] = self.coef[name]
        out[ROW["in_scale"]] = self.in_scale
        out[ROW["timestep"], :n] = self.timesteps
        out[ROW["timestep"], n] = self.timesteps[-1]
        return out


def scheduler_name(scheduler: Any) -> str:
    """Our short name for a diffusers scheduler instance, or a one-line error naming what is supported."""
    cls = type(scheduler).__name__
    if cls not in CLASS_TO_NAME:
        raise TrtkitError(f"scheduler {cls} has no device tables", hint=f"supported: {', '.join(SCHEDULERS.values())}")
    return CLASS_TO_NAME[cls]


def unsupported_reason(scheduler: Any) -> str | None:
    """Why the device tables cannot reproduce `scheduler` (a diffusers instance, as the pipeline will run it)
    step for step, or None when they can. Each "no" is a config value whose step() math the tables lack."""
    cls = type(scheduler).__name__
    if cls not in CLASS_TO_NAME:  # exact class: a subclass may override step()
        return f"scheduler {cls} has no device tables (supported: {', '.join(SCHEDULERS.values())})"
    name, cfg = CLASS_TO_NAME[cls], scheduler.config
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction"):
        return f"{cls} prediction_type {pred!r} has no device tables (epsilon or v_prediction)"
    if cfg.get("thresholding", False):
        return f"{cls} dynamic thresholding (thresholding=True) has no device tables"
    if name == "dpmpp_2m":
        if cfg.get("algorithm_type", "dpmsolver++") != "dpmsolver++":
            return f"{cls} algorithm_type {cfg.get('algorithm_type')!r} has no device tables (dpmsolver++ only)"
        if cfg.get("solver_order", 2) not in (1, 2):
            return f"{cls} solver_order {cfg.get('solver_order')} has no device tables (1 or 2)"
        for key in ("use_flow_sigmas", "use_dynamic_shifting"):
            if cfg.get(key, False):
                return f"{cls} {key}=True has no device tables"
        if cfg.get("variance_type") is not None:  # learned variance: step() splits the UNet's output channels
            return f"{cls} variance_type {cfg.get('variance_type')!r} has no device tables"
    return None


def make_scheduler(name: str, config: Any) -> Any:
    """A fresh diffusers scheduler of our short `name`, built from a config (a dict, or a scheduler's config:
    then this is diffusers' own `Cls.from_config(pipe.scheduler.config)` switch, with its defaults)."""
    import diffusers

    if name not in SCHEDULERS:
        raise TrtkitError(f"unknown scheduler {name!r}", hint=f"choose one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


def switch_scheduler(scheduler: Any, name: str | None) -> Any:
    """The scheduler `trtkit run --scheduler NAME` runs: the pipeline's own instance when NAME is None or
    its own kind (so its config, patches included, is kept as is), else diffusers' switch idiom."""
    if name is not None and name not in SCHEDULERS:
        raise TrtkitError(f"unknown scheduler {name!r}", hint=f"choose one of {', '.join(SCHEDULERS)}")
    if name is None or CLASS_TO_NAME.get(type(scheduler).__name__) == name:
        return scheduler
    return make_scheduler(name, scheduler.config)


def _f32(t: Any) -> np.ndarray:
    return np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t, dtype=np.float64)


@np.errstate(divide="ignore", invalid="ignore")  # a division by zero becomes the non-finite refusal below
def make_tables(scheduler: Any, steps: int, name: str | None = None) -> StepTables:
    """Tables for `steps` steps of `scheduler`, the diffusers instance exactly as the pipeline will run it
    (deep-copied, never mutated nor rebuilt). `name`, when given, must be its kind."""
    if steps < 1:
        raise TrtkitError(f"steps must be >= 1, got {steps}")
    reason = unsupported_reason(scheduler)
    if reason is not None:
        raise TrtkitError(reason)
    own = scheduler_name(scheduler)
    if name is not None and name != own:
        raise TrtkitError(f"make_tables: scheduler {type(scheduler).__name__} is not {name!r}",
                          hint="switch_scheduler(scheduler, name) first")
    name = own
    # A copy of the instance, not from_config(config): see the module docstring.
    sch = copy.deepcopy(scheduler)
    sch.set_timesteps(steps, device="cpu")
    cfg = sch.config
    pred = cfg.get("prediction_type", "epsilon")
    ts = _f32(sch.timesteps)
    n = len(ts)
    z = np.zeros(n)
    c: dict[str, np.ndarray] = {k: z.copy() for k in ROWS[:9]}
    in_scale = np.ones(n + 1)
    clip = 0.0
    kw: dict[str, Any] = {}
    if name in ("euler", "euler_a"):
        sig = _f32(sch.sigmas)  # (N+1,); N+2 with interpolation_type log_linear, whose step() reads [i], [i+1]
        s, s_next = sig[:n], sig[1:n + 1]
        if pred == "epsilon":
            c["A"], c["B"] = np.ones(n), -s
        else:
            c["A"], c["B"] = 1 / (s**2 + 1), -s / np.sqrt(s**2 + 1)
        in_scale[:n] = 1 / np.sqrt(s**2 + 1)
        if name == "euler":
            # x' = x + (x - x0)/s * (s_next - s); the s_churn options of step() stay at their defaults (0).
            dt = s_next - s
        else:
            s_up = np.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
            s_down = np.sqrt(s_next**2 - s_up**2)
            dt = s_down - s
            c["S"] = s_up
            kw["uses_noise"] = True
        c["P"], c["Q"] = 1 + dt / s, -dt / s
    elif name == "ddim":
        if cfg.get("num_train_timesteps") is None:  # pragma: no cover
            raise TrtkitError("DDIM config lacks num_train_timesteps")
        ac = _f32(sch.alphas_cumprod)
        final = float(_f32(sch.final_alpha_cumprod))
        t = ts.astype(np.int64)
        prev = t - cfg.num_train_timesteps // sch.num_inference_steps
        a = ac[t]
        a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final)
        beta = 1 - a
        if pred == "epsilon":
            c["A"], c["B"] = 1 / np.sqrt(a), -np.sqrt(beta) / np.sqrt(a)
            c["C"], c["D"] = np.zeros(n), np.ones(n)
        else:
            c["A"], c["B"] = np.sqrt(a), -np.sqrt(beta)
            c["C"], c["D"] = np.sqrt(beta), np.sqrt(a)
        # eta = 0 (the pipelines' default): x' = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
        c["Q"], c["E"] = np.sqrt(a_prev), np.sqrt(1 - a_prev)
        kw["uses_eps"] = True
        if cfg.get("clip_sample", False):
            clip = float(cfg.get("clip_sample_range", 1.0))
    elif name == "dpmpp_2m":
        sig = _f32(sch.sigmas)
        alpha = 1 / np.sqrt(sig**2 + 1)
        sigma_t = sig * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma_t)  # -inf where sigma is 0 (the final zero sigma)
        if pred == "epsilon":
            c["A"], c["B"] = 1 / alpha[:n], -sigma_t[:n] / alpha[:n]
        else:
            c["A"], c["B"] = alpha[:n], -sigma_t[:n]
        lower_final = bool(cfg.get("euler_at_final") or (cfg.get("lower_order_final") and n < 15)
                           or cfg.get("final_sigmas_type", "zero") == "zero")
        midpoint = cfg.get("solver_type", "midpoint") == "midpoint"
        for i in range(n):
            h = lam[i + 1] - lam[i]
            em1 = np.expm1(-h) if np.isfinite(h) else -1.0  # exp(-h) - 1
            p = sigma_t[i + 1] / sigma_t[i]
            first = cfg.solver_order == 1 or i == 0 or (i == n - 1 and lower_final)
            if first:
                c["P"][i], c["Q"][i] = p, -alpha[i + 1] * em1
                continue
            h0 = lam[i] - lam[i - 1]
            r0 = h0 / h
            if midpoint:  # D1 = (x0 - x0_prev) / r0; x' = p x - a em1 D0 - 0.5 a em1 D1
                k = 0.5 / r0
                c["P"][i], c["Q"][i], c["R"][i] = p, -alpha[i + 1] * em1 * (1 + k), alpha[i + 1] * em1 * k
            else:  # heun: x' = p x - a em1 D0 + a (em1/h + 1) D1
                k = alpha[i + 1] * (em1 / h + 1) / r0
                c["P"][i], c["Q"][i], c["R"][i] = p, -alpha[i + 1] * em1 + k, -k
        kw["uses_prev"] = True
    else:  # pragma: no cover - guarded by unsupported_reason
        raise AssertionError(name)
    bad = sorted(k for k, v in c.items() if not np.isfinite(v).all())
    if bad or not np.isfinite(in_scale).all():  # e.g. zero terminal SNR with epsilon: x0 = (x - eps) / 0 there
        raise TrtkitError(f"{type(scheduler).__name__} gives non-finite step coefficients "
                          f"({', '.join(bad) or 'input scale'}) for {steps} steps",
                          hint="rescale_betas_zero_snr needs prediction_type v_prediction")
    sigma0 = sch.init_noise_sigma
    return StepTables(family=name, timesteps=ts.astype(np.float32),
                      coef={k: v.astype(np.float32) for k, v in c.items()}, in_scale=in_scale.astype(np.float32),
                      init_noise_sigma=float(_f32(sigma0)), clip=clip, **kw)


# ---------------------------------------------------------------------------------------------
# numpy reference: the same math as the fused kernel, one step at a time


@dataclass
class LoopState:
    """The device-side state of a loop, as numpy arrays (float32)."""

    x: np.ndarray  # latents
    x0_prev: np.ndarray


def guidance_combine(noise_pred: np.ndarray, guidance: float, cfg: bool) -> np.ndarray:
    """`noise_pred` is the UNet output: [uncond; cond] stacked on the batch axis when `cfg`."""
    if not cfg:
        return noise_pred.astype(np.float32)
    u, c = np.split(noise_pred.astype(np.float32), 2, axis=0)
    return u + np.float32(guidance) * (c - u)


def scale_model_input(tables: StepTables, x: np.ndarray, i: int) -> np.ndarray:
    return x * tables.in_scale[i]


def reference_step(tables: StepTables, i: int, state: LoopState, noise_pred: np.ndarray, guidance: float,
                   cfg: bool, noise: np.ndarray | None = None) -> None:
    """Step `i` in place on `state`, in float32 as the kernel does."""
    k = {name: np.float32(v[i]) for name, v in tables.coef.items()}
    m = guidance_combine(noise_pred, guidance, cfg)
    x = state.x
    x0 = k["A"] * x + k["B"] * m
    if tables.clip:
        x0 = np.clip(x0, -tables.clip, tables.clip)
    xn = k["P"] * x + k["Q"] * x0
    if tables.uses_eps:
        xn = xn + k["E"] * (k["C"] * x + k["D"] * m)
    if tables.uses_prev:
        xn = xn + k["R"] * state.x0_prev
        state.x0_prev = x0.astype(np.float32)
    if tables.uses_noise:
        if noise is None:
            raise TrtkitError(f"scheduler {tables.family} needs noise for step {i}")
        xn = xn + k["S"] * noise
    state.x = xn.astype(np.float32)


def draw_noise(tables: StepTables, shape: tuple[int, ...], seed: int) -> np.ndarray | None:
    """(N, *shape) float32 noise for ancestral schedulers, drawn as diffusers' step() draws it on the CPU
    (`randn_tensor` with a torch generator, one draw per step), so the same seed gives the same image."""
    if not tables.uses_noise:
        return None
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    return np.stack([torch.randn(shape, generator=g, dtype=torch.float32).numpy() for _ in range(tables.steps)])
