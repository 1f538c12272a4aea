"""Parity of the device-scheduler tables (numpy reference) with diffusers' own step(), over full loops."""

from __future__ import annotations

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


def run_diffusers(name: str, config: dict, steps: int, x: np.ndarray, guidance: float, seed: int) -> np.ndarray:
    sch = make_scheduler(name, config)
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


def run_reference(name: str, config: dict, steps: int, x: np.ndarray, guidance: float, seed: int) -> np.ndarray:
    tab = make_tables(make_scheduler(name, config), steps, name)
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
