"""FlowMatchEulerDiscreteScheduler device tables (runtime/flow_tables.py) against diffusers' own step().

Each case builds the scheduler as users do (every option left unset, options passed, or loaded from a folder
written by save_pretrained), sets it up with the arguments the FLUX / SD3 pipeline would pass, and runs the
same loop twice: diffusers' set_timesteps + step() on a copy, and the tables' numpy reference step (the math
of the fused kernel), with the same deterministic stand-in for the transformer (a function of x and t, so a
wrong sigma or timestep moves the result). Both are float32: the result must match to 1e-6 relative.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trtkit.errors import TrtkitError
from trtkit.runtime.flow_tables import (
    flow_unsupported_reason,
    make_flow_tables,
    pipeline_timestep_args,
)
from trtkit.runtime.schedulers import LoopState, reference_step

TOL = 1e-6
FLUX_DEV = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
            "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}  # FLUX.1-dev's folder


def _model(x: np.ndarray, t: float) -> np.ndarray:
    """A stand-in velocity: depends on x and on the timestep the pipeline would feed the transformer."""
    return (np.tanh(x * 0.7) * (0.2 + t / 1000.0) - 0.1 * x).astype(np.float32)


def _diffusers_loop(sch: Any, args: dict[str, Any], x: np.ndarray, begin0: bool) -> np.ndarray:
    s = copy.deepcopy(sch)
    kw = dict(args)
    if kw.get("sigmas") is not None:
        kw.pop("num_inference_steps")
    s.set_timesteps(device="cpu", **kw)
    if begin0:  # FluxPipeline sets it; StableDiffusion3Pipeline does not
        s.set_begin_index(0)
    xt = torch.from_numpy(x.copy())
    for t in s.timesteps:
        v = torch.from_numpy(_model(xt.numpy(), float(t)))
        xt = s.step(v, t, xt, return_dict=False)[0]
    return xt.numpy()


def _table_loop(sch: Any, args: dict[str, Any], x: np.ndarray) -> np.ndarray:
    tab = make_flow_tables(sch, args)
    st = LoopState(x=x.copy(), x0_prev=np.zeros_like(x))
    for i in range(tab.steps):
        reference_step(tab, i, st, _model(st.x, float(tab.timesteps[i])), 1.0, False)
    return st.x


CASES = [  # (pipeline kind, scheduler options, steps, image tokens)
    ("sd3", {}, 28, 4096),  # every option unset
    ("sd3", {"shift": 3.0}, 28, 4096),  # SD3.5's folder
    ("sd3", {"shift": 3.0, "use_dynamic_shifting": True}, 10, 1024),  # mu from the SD3 pipeline's defaults
    ("sd3", {"shift": 3.0, "use_karras_sigmas": True}, 12, 4096),
    ("sd3", {"shift": 3.0, "use_exponential_sigmas": True}, 12, 4096),
    ("sd3", {"shift": 3.0, "use_beta_sigmas": True}, 12, 4096),
    ("sd3", {"shift": 3.0, "invert_sigmas": True}, 8, 4096),
    ("sd3", {"shift": 1.0}, 1, 4096),
    ("flux", FLUX_DEV, 28, 4096),  # FLUX.1-dev at 1024x1024
    ("flux", FLUX_DEV, 50, 1024),
    ("flux", FLUX_DEV | {"shift_terminal": 0.02}, 20, 4096),
    ("flux", FLUX_DEV | {"time_shift_type": "linear"}, 20, 2304),
    ("flux", {"use_dynamic_shifting": True}, 4, 256),  # FLUX.1-schnell-like, defaults unset
    ("flux", FLUX_DEV | {"use_karras_sigmas": True}, 10, 4096),
]


@pytest.mark.parametrize("build", ["unset", "folder"])
@pytest.mark.parametrize("kind,opts,steps,seq", CASES)
def test_tables_match_diffusers_steps(kind: str, opts: dict[str, Any], steps: int, seq: int, build: str,
                                      tmp_path: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(**opts)
    if build == "folder":
        sch.save_pretrained(tmp_path)
        sch = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    args = pipeline_timestep_args(kind, sch, steps, seq)
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    ref = _diffusers_loop(sch, args, x, begin0=kind == "flux")
    ours = _table_loop(sch, args, x)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < TOL, err


def test_user_sigmas_and_mu_are_the_pipelines() -> None:
    """FLUX: the call's own sigmas replace the linspace; SD3: an explicit mu is passed on."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(**FLUX_DEV)
    args = pipeline_timestep_args("flux", sch, 3, 4096, sigmas=[1.0, 0.6, 0.2])
    assert list(args["sigmas"]) == [1.0, 0.6, 0.2]
    assert make_flow_tables(sch, args).steps == 3
    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    assert pipeline_timestep_args("sd3", sd3, 5, 4096, mu=0.7)["mu"] == 0.7
    x = np.ones((1, 4, 2, 2), np.float32)
    a = pipeline_timestep_args("sd3", sd3, 5, 4096, mu=0.7)
    assert np.abs(_table_loop(sd3, a, x) - _diffusers_loop(sd3, a, x, False)).max() < 1e-6


def test_use_flow_sigmas_drops_flux_sigmas() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(**FLUX_DEV)
    sch.register_to_config(use_flow_sigmas=True)  # a config key of other schedulers, read by FluxPipeline
    assert pipeline_timestep_args("flux", sch, 4, 4096)["sigmas"] is None


def test_tables_leave_the_scheduler_alone() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(**FLUX_DEV)
    make_flow_tables(sch, pipeline_timestep_args("flux", sch, 4, 4096))
    assert sch.timesteps is None or len(sch.timesteps) == 1000


def test_refusals_are_one_line() -> None:
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    stoch = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    assert "stochastic_sampling" in flow_unsupported_reason(stoch)
    assert "EulerDiscreteScheduler" in flow_unsupported_reason(EulerDiscreteScheduler())
    assert flow_unsupported_reason(FlowMatchEulerDiscreteScheduler()) is None
    with pytest.raises(TrtkitError, match="stochastic_sampling"):
        make_flow_tables(stoch, {"num_inference_steps": 4})
    with pytest.raises(TrtkitError, match="mu"):  # dynamic shifting needs mu: diffusers' words, one line
        make_flow_tables(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), {"num_inference_steps": 4})
    with pytest.raises(TrtkitError, match="steps"):
        make_flow_tables(FlowMatchEulerDiscreteScheduler(), {"num_inference_steps": 0})
    with pytest.raises(TrtkitError, match="flux or sd3"):
        pipeline_timestep_args("sdxl", FlowMatchEulerDiscreteScheduler(), 4, 256)
