"""The NVRTC kernels against the numpy reference, step by step, with random model outputs."""

from __future__ import annotations

import numpy as np
import pytest

from trtkit.runtime.schedulers import LoopState, draw_noise, make_scheduler, make_tables, reference_step

BASE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon"}


def _to_io(a: np.ndarray, io: str) -> np.ndarray:
    if io == "float32":
        return a.astype(np.float32)
    if io == "float16":
        return a.astype(np.float16)
    b = a.astype(np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def _from_io(a: np.ndarray, io: str) -> np.ndarray:
    if io == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("io", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name,extra", [("euler", {}), ("euler_a", {}), ("ddim", {}),
                                        ("ddim", {"clip_sample": False}), ("dpmpp_2m", {}),
                                        ("dpmpp_2m", {"prediction_type": "v_prediction"})])
@pytest.mark.parametrize("cfg", [True, False])
def test_step_kernel_matches_reference(name: str, extra: dict, io: str, cfg: bool) -> None:
    from trtkit.runtime import cuda
    from trtkit.runtime.kernels import KernelSpec, LoopPointers, get_kernels

    steps, shape = 12, (1, 4, 33, 20)  # odd sizes: grid-stride tails
    tab = make_tables(make_scheduler(name, {**BASE, **extra}), steps, name)
    rng = np.random.default_rng(steps)
    n = int(np.prod(shape))
    b = 2 if cfg else 1
    x_init = rng.standard_normal(shape).astype(np.float32) * tab.init_noise_sigma
    noise = draw_noise(tab, shape, 7)
    preds = [_to_io(rng.standard_normal((b, *shape[1:])).astype(np.float32), io) for _ in range(steps)]
    g = 6.5
    s = cuda.Stream()
    A = cuda.DeviceArray
    io_np = np.float32 if io == "float32" else (np.float16 if io == "float16" else np.uint16)
    d = dict(x_init=A.from_host(x_init), x=A.empty(shape, np.float32), x0_prev=A.empty(shape, np.float32),
             noise=A.from_host(noise if noise is not None else np.zeros(1, np.float32)),
             sample=A.empty((b, *shape[1:]), io_np), noise_pred=A.empty((b, *shape[1:]), io_np),
             timestep=A.empty((1,), np.float32), counter=A.empty((1,), np.int32), table=A.from_host(tab.packed()),
             params=A.from_host(np.array([g, 0, 0, 0], np.float32)))
    d["x0_prev"].upload(np.full(shape, np.nan, np.float32))  # poisoned: init must clear it
    p = LoopPointers(**{k: v.ptr for k, v in d.items()}, n=n, np1=steps + 1, cfg=int(cfg))
    k = get_kernels(KernelSpec.for_tables(tab, io, cuda.compute_capability()))
    k.launch_init(p, s.handle)
    st = LoopState(x=x_init.copy(), x0_prev=np.zeros(shape, np.float32))
    sample0 = _from_io(d["sample"].download(s.handle), io)
    np.testing.assert_allclose(sample0[-1], _from_io(_to_io(x_init * tab.in_scale[0], io), io)[0], rtol=1e-6)
    for i in range(steps):
        assert d["counter"].download(s.handle)[0] == i
        assert d["timestep"].download(s.handle)[0] == tab.timesteps[i]
        d["noise_pred"].upload(preds[i], s.handle)
        k.launch_step(p, s.handle)
        k.launch_advance(p, s.handle)
        reference_step(tab, i, st, _from_io(preds[i], io), g, cfg, None if noise is None else noise[i])
        got = d["x"].download(s.handle)
        # float32 math in both; the kernel may contract a*b+c into one FMA: ~1e-6 relative per step
        np.testing.assert_allclose(got, st.x, rtol=1e-4, atol=1e-4 * np.abs(st.x).max())
        want_in = _from_io(_to_io(st.x * tab.in_scale[i + 1], io), io)
        got_in = _from_io(d["sample"].download(s.handle), io)
        tol = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}[io]
        for h in range(b):
            np.testing.assert_allclose(got_in[h:h + 1], want_in, rtol=tol, atol=tol * np.abs(want_in).max())
    s.close()
