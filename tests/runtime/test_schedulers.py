"""Parity of the device-scheduler tables (numpy reference) with diffusers' own step(), over full loops."""

from __future__ import annotations

import copy
import inspect
import itertools
from typing import Any

import numpy as np
import pytest
import torch

from trtkit.errors import TrtkitError
from trtkit.runtime.schedulers import (
    SCHEDULERS,
    LoopState,
    draw_noise,
    make_scheduler,
    make_tables,
    reference_step,
    scale_model_input,
    switch_scheduler,
    unsupported_reason,
)

BASE = {  # SDXL base / SD 1.5 scheduler config (the tiny pipeline's too)
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon",
}
SHAPE = (1, 4, 8, 8)
# Float32 everywhere; diffusers computes the same terms in another order. Measured worst case 3e-6.
RTOL = 2e-5


def fake_unet(sample: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the UNet: depends on the input and the timestep, batch [uncond; cond]."""
    s = sample.astype(np.float64)
    u = 0.9 * np.tanh(s) + 0.1 * np.sin(t / 97.0)
    c = 0.8 * u + 0.1 * np.cos(s[::-1])
    out = np.concatenate([u[:1], c[1:]], axis=0) if s.shape[0] == 2 else c
    return out.astype(np.float32)


def run_diffusers(name: str, config: dict, steps: int, x: np.ndarray, guidance: float, seed: int,
                  sch: Any = None) -> np.ndarray:
    """diffusers' own loop: `sch` when given (it is stepped, so pass a fresh one), else a new one of `config`."""
    sch = make_scheduler(name, config) if sch is None else sch
    sch.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(seed)
    lat = torch.from_numpy(x.copy()) * sch.init_noise_sigma
    cfg = guidance > 1
    for t in sch.timesteps:
        inp = torch.cat([lat] * 2) if cfg else lat
        inp = sch.scale_model_input(inp, t)
        out = torch.from_numpy(fake_unet(inp.numpy(), float(t)))
        if cfg:
            u, c = out.chunk(2)
            out = u + guidance * (c - u)
        lat = sch.step(out, t, lat, generator=g, return_dict=False)[0]
    return lat.numpy()


def run_reference(name: str, config: dict, steps: int, x: np.ndarray, guidance: float, seed: int,
                  sch: Any = None) -> np.ndarray:
    tab = make_tables(make_scheduler(name, config) if sch is None else sch, steps, name)
    state = LoopState(x=(x * np.float32(tab.init_noise_sigma)).astype(np.float32), x0_prev=np.zeros_like(x))
    noise = draw_noise(tab, x.shape, seed)
    cfg = guidance > 1
    for i in range(tab.steps):
        inp = scale_model_input(tab, state.x, i)
        out = fake_unet(np.concatenate([inp] * 2) if cfg else inp, float(tab.timesteps[i]))
        reference_step(tab, i, state, out, guidance, cfg, None if noise is None else noise[i])
    return state.x


CASES = [
    ("euler", {}, 30), ("euler", {"timestep_spacing": "trailing"}, 8), ("euler", {"use_karras_sigmas": True}, 20),
    ("euler", {"prediction_type": "v_prediction"}, 25),
    ("euler_a", {}, 30), ("euler_a", {"timestep_spacing": "trailing"}, 12),
    ("ddim", {"clip_sample": False}, 30), ("ddim", {}, 20), ("ddim", {"prediction_type": "v_prediction",
                                                                       "clip_sample": False}, 15),
    ("dpmpp_2m", {}, 30), ("dpmpp_2m", {}, 10), ("dpmpp_2m", {"use_karras_sigmas": True}, 25),
    ("dpmpp_2m", {"prediction_type": "v_prediction"}, 20), ("dpmpp_2m", {"solver_type": "heun"}, 20),
]


@pytest.mark.parametrize("name,extra,steps", CASES)
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_full_loop_matches_diffusers(name: str, extra: dict, steps: int, guidance: float) -> None:
    x = np.random.default_rng(steps).standard_normal(SHAPE).astype(np.float32)
    cfg = {**BASE, **extra}
    ref = run_diffusers(name, cfg, steps, x, guidance, seed=3)
    ours = run_reference(name, cfg, steps, x, guidance, seed=3)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert np.isfinite(ours).all() and err < RTOL, f"{name} {extra}: rel err {err:.2e}"


def test_every_scheduler_is_covered() -> None:
    assert {c[0] for c in CASES} == set(SCHEDULERS)


def test_scale_model_input_matches_diffusers() -> None:
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    for name in SCHEDULERS:
        sch = make_scheduler(name, BASE)
        sch.set_timesteps(30)
        tab = make_tables(sch, 30, name)
        for i in (0, 7, 29):
            sch._step_index = i  # scale_model_input reads the step index diffusers keeps on the host
            want = sch.scale_model_input(torch.from_numpy(x), sch.timesteps[i]).numpy()
            np.testing.assert_allclose(scale_model_input(tab, x, i), want, rtol=1e-6)


def test_packed_table_layout() -> None:
    tab = make_tables(make_scheduler("euler", BASE), 30, "euler")
    p = tab.packed()
    assert p.shape == (11, 31) and p.dtype == np.float32
    assert p[-1, 30] == p[-1, 29]  # the padded column repeats the last timestep


def test_bad_inputs_are_one_line_errors() -> None:
    with pytest.raises(TrtkitError, match="unknown scheduler"):
        make_scheduler("lms", BASE)
    with pytest.raises(TrtkitError, match="prediction_type"):
        make_tables(make_scheduler("euler", {**BASE, "prediction_type": "sample"}), 10, "euler")
    with pytest.raises(TrtkitError, match="steps"):
        make_tables(make_scheduler("euler", BASE), 0, "euler")
    from diffusers import LMSDiscreteScheduler

    with pytest.raises(TrtkitError, match="no device tables"):
        make_tables(LMSDiscreteScheduler.from_config(BASE), 10)


# --- every option of every supported scheduler: reproduced exactly, or refused by unsupported_reason ---------

# Values tried for each __init__ parameter of the four classes (one at a time, on BASE). A parameter that a new
# diffusers release adds is missing here and fails test_every_option_is_listed until it is classified.
OPTION_VALUES: dict[str, list[Any]] = {
    "num_train_timesteps": [500], "beta_start": [0.0001], "beta_end": [0.02],
    "beta_schedule": ["linear", "squaredcos_cap_v2"], "trained_betas": [np.linspace(1e-4, 0.02, 1000).tolist()],
    "prediction_type": ["epsilon", "v_prediction", "sample"], "timestep_spacing": ["leading", "trailing", "linspace"],
    "steps_offset": [0, 1], "rescale_betas_zero_snr": [True],
    # Euler
    "interpolation_type": ["log_linear"], "use_karras_sigmas": [True], "use_exponential_sigmas": [True],
    "use_beta_sigmas": [True], "sigma_min": [0.1], "sigma_max": [10.0], "timestep_type": ["continuous"],
    "final_sigmas_type": ["sigma_min"],
    # DDIM
    "clip_sample": [True, False], "clip_sample_range": [0.5], "set_alpha_to_one": [True, False],
    "thresholding": [True], "dynamic_thresholding_ratio": [0.9], "sample_max_value": [0.5],
    # DPM-Solver
    "solver_order": [1, 3], "algorithm_type": ["sde-dpmsolver++", "dpmsolver"], "solver_type": ["heun"],
    "lower_order_final": [False], "euler_at_final": [True], "use_lu_lambdas": [True], "use_flow_sigmas": [True],
    "flow_shift": [3.0], "lambda_min_clipped": [-5.1], "variance_type": ["learned_range"],
    "use_dynamic_shifting": [True], "time_shift_type": ["linear"],
}
# Measured worst case over the sweep: 8.9e-5 (DDIM, beta_end 0.02, 25 steps). That is float32 rounding, not
# math: against a float64 run of diffusers' own DDIM step() the two float32 loops are 6.5e-5 (diffusers) and
# 6.8e-5 (tables) away. A wrong coefficient (a shifted timestep, a missing clip) moves latents by > 1e-3.
SWEEP_RTOL = 2e-4


def _init_params(cls_name: str) -> list[str]:
    import diffusers

    return list(inspect.signature(getattr(diffusers, cls_name).__init__).parameters)[1:]


def test_every_option_is_listed() -> None:
    for cls_name in SCHEDULERS.values():
        missing = set(_init_params(cls_name)) - set(OPTION_VALUES)
        assert not missing, f"{cls_name}: classify {sorted(missing)} in OPTION_VALUES"


def _sweep() -> list[tuple[str, dict]]:
    cases = []
    for name, cls_name in SCHEDULERS.items():
        for opt in _init_params(cls_name):
            for val in OPTION_VALUES[opt]:
                for pred in ("epsilon", "v_prediction"):
                    cases.append((name, {"prediction_type": pred, opt: val}))
    return cases


def _build(name: str, cfg: dict) -> Any:
    import diffusers

    return getattr(diffusers, SCHEDULERS[name])(**cfg)


@pytest.mark.parametrize("name,extra", _sweep(), ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={str(x)[:12]}" for k, x in v.items()))
def test_every_option_is_reproduced_or_refused(name: str, extra: dict) -> None:
    """The tables never give a silently different loop: for each option value either unsupported_reason names
    it, or make_tables refuses it (non-finite coefficients), or the loop matches diffusers' step()."""
    cfg = {**BASE, **extra}
    try:
        sch = _build(name, cfg)
    except Exception:  # a combination diffusers itself refuses to build (e.g. dpmsolver with a zero final sigma)
        pytest.skip("diffusers refuses this config")
    if unsupported_reason(sch) is not None:
        with pytest.raises(TrtkitError):
            make_tables(sch, 6)
        return
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    for steps in (6, 25):  # < 15 and >= 15: DPM-Solver's lower_order_final switches at 15
        try:
            ref = run_diffusers(name, cfg, steps, x, 7.5, seed=3, sch=_build(name, cfg))
        except Exception as e:
            pytest.fail(f"diffusers fails ({e}) on a config unsupported_reason accepts")
        try:
            ours = run_reference(name, cfg, steps, x, 7.5, seed=3, sch=sch)
        except TrtkitError:
            assert not np.isfinite(ref).all(), "make_tables refused a config diffusers runs finitely"
            continue
        err = np.abs(ours - ref).max() / np.abs(ref).max()
        assert err < SWEEP_RTOL, f"{name} {extra} {steps} steps: rel err {err:.2e}"


def _grid(name: str) -> list[dict]:
    """The options users set most, as a full product per scheduler (cheap here: no UNet)."""
    axes: dict[str, list[Any]] = {"timestep_spacing": ["leading", "trailing", "linspace"], "steps_offset": [0, 1],
                                  "prediction_type": ["epsilon", "v_prediction"]}
    if name in ("euler", "dpmpp_2m"):
        axes["use_karras_sigmas"] = [False, True]
    if name == "ddim":
        axes["clip_sample"] = [False, True]
    return [dict(zip(axes, v, strict=True)) for v in itertools.product(*axes.values())]


@pytest.mark.parametrize("name,extra", [(n, e) for n in SCHEDULERS for e in _grid(n)],
                         ids=lambda v: v if isinstance(v, str) else ",".join(str(x)[:5] for x in v.values()))
def test_common_options_full_product(name: str, extra: dict) -> None:
    x = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    cfg = {**BASE, **extra}
    for steps, guidance in ((5, 7.5), (20, 1.0)):
        ref = run_diffusers(name, cfg, steps, x, guidance, seed=4)
        ours = run_reference(name, cfg, steps, x, guidance, seed=4)
        err = np.abs(ours - ref).max() / np.abs(ref).max()
        assert err < SWEEP_RTOL, f"{name} {extra} {steps} steps: rel err {err:.2e}"


def test_tables_follow_the_instance_not_its_config() -> None:
    """Issue 13: diffusers pipelines patch their scheduler's config in place (StableDiffusionPipeline sets
    clip_sample False and steps_offset 1 this way); from_config(config) puts back the class defaults for keys the
    user left unset. The tables must follow the patched instance, as diffusers' step() does."""
    from diffusers import DDIMScheduler
    from diffusers.configuration_utils import FrozenDict

    sch = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing")
    patched = dict(sch.config)
    patched.update(clip_sample=False, steps_offset=1)
    sch._internal_dict = FrozenDict(patched)  # what the pipeline's __init__ does
    rebuilt = DDIMScheduler.from_config(sch.config)
    assert rebuilt.config.clip_sample and rebuilt.config.steps_offset == 0  # the cause: from_config forgets
    assert make_tables(sch, 25).clip == 0.0
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32) * 3  # large enough to be clipped
    ref = run_diffusers("ddim", {}, 25, x, 7.0, seed=0, sch=copy.deepcopy(sch))
    ours = run_reference("ddim", {}, 25, x, 7.0, seed=0, sch=sch)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < RTOL
    stale = run_reference("ddim", {}, 25, x, 7.0, seed=0, sch=rebuilt)
    assert np.abs(stale - ref).max() / np.abs(ref).max() > 1e-2  # the old way was visibly wrong here


def test_make_tables_does_not_touch_the_instance() -> None:
    sch = make_scheduler("dpmpp_2m", BASE)
    sch.set_timesteps(7)
    before = sch.timesteps.clone()
    make_tables(sch, 30)
    assert sch.num_inference_steps == 7 and torch.equal(sch.timesteps, before)


UNSUPPORTED = [  # class kwargs -> what unsupported_reason must name (None: supported)
    ("EulerDiscreteScheduler", {}, None),
    ("EulerDiscreteScheduler", {"prediction_type": "sample"}, "prediction_type"),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, None),
    ("EulerAncestralDiscreteScheduler", {"rescale_betas_zero_snr": True}, None),
    ("DDIMScheduler", {"thresholding": True}, "thresholding"),
    ("DDIMScheduler", {"clip_sample": True, "clip_sample_range": 2.0}, None),
    ("DDIMScheduler", {"prediction_type": "sample"}, "prediction_type"),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, "solver_order"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True}, "use_flow_sigmas"),
    ("DPMSolverMultistepScheduler", {"variance_type": "learned_range"}, "variance_type"),
    ("DPMSolverMultistepScheduler", {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ("DPMSolverMultistepScheduler", {"thresholding": True}, "thresholding"),
    ("DPMSolverMultistepScheduler", {"solver_order": 1, "solver_type": "heun", "euler_at_final": True}, None),
    ("LMSDiscreteScheduler", {}, "no device tables"),
    ("PNDMScheduler", {}, "no device tables"),
    ("UniPCMultistepScheduler", {}, "no device tables"),
]


@pytest.mark.parametrize("cls_name,kw,want", UNSUPPORTED)
def test_unsupported_reason(cls_name: str, kw: dict, want: str | None) -> None:
    import diffusers

    reason = unsupported_reason(getattr(diffusers, cls_name)(**kw))
    if want is None:
        assert reason is None
    else:
        assert reason is not None and want in reason and "\n" not in reason


def test_unsupported_reason_refuses_subclasses() -> None:
    from diffusers import EulerDiscreteScheduler

    class Mine(EulerDiscreteScheduler):  # its step() may differ: the tables cannot know
        pass

    assert "no device tables" in (unsupported_reason(Mine()) or "")


def test_switch_scheduler() -> None:
    """`trtkit run --scheduler`: the folder's own instance when the name is its kind, else diffusers' switch."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    own = DDIMScheduler(**BASE)
    assert switch_scheduler(own, None) is own and switch_scheduler(own, "ddim") is own
    other = switch_scheduler(own, "euler")
    assert type(other) is EulerDiscreteScheduler and other.config.steps_offset == 1
    with pytest.raises(TrtkitError, match="unknown scheduler"):
        switch_scheduler(own, "lms")
    with pytest.raises(TrtkitError, match="is not 'euler'"):
        make_tables(own, 5, "euler")


def test_non_finite_coefficients_are_refused() -> None:
    """DDIM, zero terminal SNR, epsilon, a step at t=999: x0 = (x - eps) / 0. diffusers gives NaN, or +-1 where
    it clips; the tables can give neither, so they refuse with one line (v-prediction, the intended pairing, runs)."""
    from diffusers import DDIMScheduler

    cfg = {**BASE, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    with pytest.raises(TrtkitError, match="non-finite") as e:
        make_tables(DDIMScheduler(**cfg), 10)
    assert "\n" not in str(e.value)
    assert make_tables(DDIMScheduler(**{**cfg, "prediction_type": "v_prediction"}), 10).steps == 10
