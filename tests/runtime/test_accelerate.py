"""`trtkit.accelerate(pipe)`: the user's call, unchanged, gives diffusers' own result (tiny SDXL, CPU)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import trtkit
from trtkit.errors import TrtkitError
from trtkit.runtime.schedulers import make_scheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/runtime/conftest.py


@pytest.fixture(scope="module")
def sdxl(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    p.set_progress_bar_config(disable=True)
    return p


def _call(p, **kw):  # type: ignore[no-untyped-def]
    return p("a red cube", negative_prompt="blurry", num_inference_steps=5, guidance_scale=6.0, height=128,
             width=128, generator=torch.Generator("cpu").manual_seed(3), output_type="latent", **kw).images


@pytest.mark.parametrize("name", ["euler", "euler_a", "ddim", "dpmpp_2m"])
def test_same_call_same_latents(sdxl, name: str) -> None:  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionXLPipeline

    sdxl.scheduler = make_scheduler(name, sdxl.scheduler.config)
    if type(sdxl) is not StableDiffusionXLPipeline:  # undo an earlier test's accelerate for the reference
        sdxl.__class__ = StableDiffusionXLPipeline
        sdxl._trtkit = None
    want = _call(sdxl).numpy()
    pipe = trtkit.accelerate(sdxl)
    assert pipe is sdxl and isinstance(pipe, StableDiffusionXLPipeline) and type(pipe).__name__.startswith("Acc")
    got = _call(pipe).numpy()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-4, f"{name}: {err:.2e}"


def test_images_and_fallback(sdxl, caplog) -> None:  # type: ignore[no-untyped-def]
    pipe = trtkit.accelerate(sdxl)
    img = pipe("x", num_inference_steps=2, height=64, width=64).images[0]
    assert img.size == (64, 64)
    seen = []
    with caplog.at_level(logging.WARNING):
        pipe("x", num_inference_steps=2, height=64, width=64, output_type="latent",
             callback_on_step_end=lambda p, i, t, kw: seen.append(i) or kw)
    assert seen == [0, 1] and "callback_on_step_end" in caplog.text  # diffusers' own loop ran


def test_backend_is_checked(sdxl, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TrtkitError, match="backend must be 'trt' or 'rtx'"):
        trtkit.accelerate(sdxl, backend="cuda")


def test_unsupported_scheduler_is_one_line_error(sdxl) -> None:  # type: ignore[no-untyped-def]
    from diffusers import LMSDiscreteScheduler

    old = sdxl.scheduler
    sdxl.scheduler = LMSDiscreteScheduler.from_config(old.config)
    try:
        with pytest.raises(TrtkitError, match="no device tables"):
            trtkit.accelerate(sdxl)
    finally:
        sdxl.scheduler = old


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["euler", "euler_a", "ddim", "dpmpp_2m"])
def test_accelerate_on_gpu_fp16(tiny_model_dir: Path, name: str) -> None:
    """fp16 on the GPU: diffusers keeps latents in fp16 between steps, the runtime in fp32, so the two
    differ by fp16 rounding. Stated tolerance, of the latents' range: 2e-2; 1e-1 for DDIM, whose diffusers
    step() does its whole update in fp16 (no float32 upcast, unlike the other three) and clamps x0
    (measured on the H100 with plain kernels: 5.9e-2). The reference is diffusers' own loop over the same
    UNet after accelerate() gave it the tuned kernels, so that only the loops differ; what the kernel
    choice alone changes is tested in test_executors.py."""
    from diffusers import StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float16).to("cuda")
    p.set_progress_bar_config(disable=True)
    p.scheduler = make_scheduler(name, p.scheduler.config)
    pipe = trtkit.accelerate(p)
    want = _call(functools.partial(pipe._trtkit.original_call, pipe)).float().cpu().numpy()
    got = _call(pipe).float().cpu().numpy()
    assert pipe._trtkit.runner.captures == 1
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < (1e-1 if name == "ddim" else 2e-2), f"{name}: {err:.2e}"


SAME_LOOP = [  # one family and one number of steps: new tables, the same loop (and on a GPU the same graph)
    {}, dict(timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(timestep_spacing="linspace", use_karras_sigmas=True), dict(steps_offset=0, interpolation_type="log_linear"),
]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_scheduler_changed_after_accelerate(tiny_model_dir: Path, device: str) -> None:
    """`pipe.scheduler` replaced after accelerate(), as users switch schedulers: every call builds its tables from
    the scheduler of that moment, and a captured graph is reused with them (float32; TF32 off on a GPU, so the
    tolerance is the CPU's: measured ~1e-6 there)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir)).to(device)
    p.set_progress_bar_config(disable=True)
    pipe = trtkit.accelerate(p, kernels="plain")
    diffusers_call = functools.partial(pipe._trtkit.original_call, pipe)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for extra in SAME_LOOP:
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, **extra)

            def call(f):  # type: ignore[no-untyped-def]
                return f("a red cube", num_inference_steps=4, guidance_scale=6.0, height=64, width=64,
                         generator=torch.Generator("cpu").manual_seed(3), output_type="latent").images.cpu().numpy()

            want, got = call(diffusers_call), call(pipe)
            err = np.abs(got - want).max() / np.abs(want).max()
            assert err < 1e-4, f"{extra}: {err:.2e}"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    if device == "cuda":
        assert pipe._trtkit.runner.captures == 1
