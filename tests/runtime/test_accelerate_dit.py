"""`trtkit.accelerate` on FluxPipeline / StableDiffusion3Pipeline gives diffusers' own latents and images.

Two pipelines are loaded from the same tiny folder (trtkit/tiny_dit.py, seeded random weights, scheduler from
its saved config): one left to diffusers, one accelerated; the same call with the same generator seed must give
the same latents (`output_type="latent"`: FLUX's packed tokens, SD3's latent) and the same decoded images.
Both are float32 on the CPU, and the flow-matching step and CFG combine are the same float32 operations in the
same order, so the results are equal to rounding (measured: bit-identical); TOL leaves room for BLAS order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import trtkit
from trtkit.errors import TrtkitError

TOL = 1e-5


@pytest.fixture(scope="module")
def dit_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from trtkit.tiny_dit import make_tiny_dit_pipeline

    root = tmp_path_factory.mktemp("dit")
    return {f: make_tiny_dit_pipeline(f, root / f, seed=0) for f in ("flux", "sd3")}


def _pair(path: Path) -> tuple[Any, Any]:
    from diffusers import DiffusionPipeline

    ref, acc = DiffusionPipeline.from_pretrained(path), DiffusionPipeline.from_pretrained(path)
    for p in (ref, acc):
        p.set_progress_bar_config(disable=True)
    return ref, trtkit.accelerate(acc)


def _rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


def _both(ref: Any, acc: Any, *args: Any, seed: int = 0, runtime: bool = True, **kw: Any) -> tuple[Any, Any]:
    """The call on both pipelines; `runtime`: the accelerated one must have run the runtime's loop (not a
    fallback to diffusers' own, which would match trivially)."""
    a = ref(*args, generator=torch.Generator().manual_seed(seed), **kw)
    acc.__dict__.pop("_trtkit_timings_ms", None)
    b = acc(*args, generator=torch.Generator().manual_seed(seed), **kw)
    assert ("_trtkit_timings_ms" in acc.__dict__) == runtime
    return a, b


@pytest.fixture(scope="module")
def flux(dit_dirs: dict[str, Path], one_torch_thread: None) -> tuple[Any, Any]:
    return _pair(dit_dirs["flux"])


@pytest.fixture(scope="module")
def sd3(dit_dirs: dict[str, Path], one_torch_thread: None) -> tuple[Any, Any]:
    return _pair(dit_dirs["sd3"])


def test_accelerated_class_and_runtime_path(flux: tuple[Any, Any], sd3: tuple[Any, Any]) -> None:
    assert type(flux[1]).__name__ == "AcceleratedFluxPipeline"
    assert type(sd3[1]).__name__ == "AcceleratedStableDiffusion3Pipeline"
    flux[1]("x", num_inference_steps=2, height=64, width=64, output_type="latent")
    assert flux[1]._trtkit.runner.loop.tables.family == "flow_euler"  # the loop ran on the runtime


@pytest.mark.parametrize("kw", [
    {"prompt": ["a cat", "a red dog"], "num_images_per_prompt": 2, "height": 128, "width": 96,
     "num_inference_steps": 4},
    {"prompt": "a cat", "guidance_scale": 5.0, "height": 64, "width": 128, "num_inference_steps": 3,
     "max_sequence_length": 64},
    {"prompt": "a cat", "num_inference_steps": 3, "sigmas": [1.0, 0.5, 0.25], "height": 64, "width": 64},
    {"prompt": "defaults", "num_inference_steps": 1},  # height / width from the pipeline: 1024 x 1024
])
def test_flux_latents_match_diffusers(flux: tuple[Any, Any], kw: dict[str, Any]) -> None:
    a, b = _both(*flux, output_type="latent", **kw)
    assert a.images.shape == b.images.shape
    assert _rel(a.images, b.images) < TOL


def test_flux_images_positional_and_tuple(flux: tuple[Any, Any]) -> None:
    # FluxPipeline.__call__(prompt, prompt_2, negative_prompt, negative_prompt_2, true_cfg_scale, height, width, steps)
    a, b = _both(*flux, "a cat", None, None, None, 1.0, 64, 96, 3, output_type="np", return_dict=False)
    assert isinstance(b, tuple) and a[0].shape == b[0].shape == (1, 64, 96, 3)
    assert np.abs(a[0] - b[0]).max() < 1e-4
    a, b = _both(*flux, "a cat", height=64, width=64, num_inference_steps=2)  # PIL, as diffusers
    assert np.abs(np.asarray(a.images[0], np.int16) - np.asarray(b.images[0], np.int16)).max() <= 1


def test_flux_prompt_embeds_in(flux: tuple[Any, Any]) -> None:
    """The issue's baseline: embeddings in, latents out."""
    g = torch.Generator().manual_seed(1)
    pe = torch.randn(1, 32, 32, generator=g)
    pooled = torch.randn(1, 32, generator=g)
    a, b = _both(*flux, prompt_embeds=pe, pooled_prompt_embeds=pooled, height=64, width=64, num_inference_steps=3,
                 output_type="latent")
    assert _rel(a.images, b.images) < TOL


@pytest.mark.parametrize("kw", [
    {"prompt": ["a cat", "a dog"], "negative_prompt": ["blurry", "dark"], "num_images_per_prompt": 2,
     "height": 128, "width": 64, "num_inference_steps": 4},
    {"prompt": "a cat", "guidance_scale": 1.0, "height": 64, "width": 64, "num_inference_steps": 3},  # no CFG
    {"prompt": "defaults"},  # 256 x 256 (the transformer's sample_size), 28 steps, guidance 7
    {"prompt": "a cat", "num_inference_steps": 3, "mu": 0.8, "height": 64, "width": 64},
])
def test_sd3_latents_match_diffusers(sd3: tuple[Any, Any], kw: dict[str, Any]) -> None:
    if "mu" in kw:  # mu is used where the scheduler shifts dynamically
        for p in sd3:
            p.scheduler.register_to_config(use_dynamic_shifting=True)
    try:
        a, b = _both(*sd3, output_type="latent", **kw)
    finally:
        for p in sd3:
            p.scheduler.register_to_config(use_dynamic_shifting=False)
    assert a.images.shape == b.images.shape
    assert _rel(a.images, b.images) < TOL


def test_sd3_images(sd3: tuple[Any, Any]) -> None:
    a, b = _both(*sd3, "a cat", height=64, width=96, num_inference_steps=3, output_type="np")
    assert np.abs(a.images - b.images).max() < 1e-4


@pytest.mark.parametrize("opts", [{}, {"shift": 3.0, "use_dynamic_shifting": True}, {"use_karras_sigmas": True},
                                  {"shift": 2.0, "shift_terminal": 0.05}])
def test_sd3_other_scheduler_configs(sd3: tuple[Any, Any], opts: dict[str, Any]) -> None:
    """A scheduler the user built by hand (every other option unset) and set on both pipelines."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    old = [p.scheduler for p in sd3]
    for p in sd3:
        p.scheduler = FlowMatchEulerDiscreteScheduler(**opts)
    try:
        a, b = _both(*sd3, "a cat", height=64, width=64, num_inference_steps=5, output_type="latent")
    finally:
        for p, s in zip(sd3, old, strict=True):
            p.scheduler = s
    assert _rel(a.images, b.images) < TOL


def test_unhandled_arguments_run_diffusers(flux: tuple[Any, Any], caplog: pytest.LogCaptureFixture) -> None:
    seen = []

    def cb(pipe: Any, i: int, t: Any, kw: dict) -> dict:
        seen.append(i)
        return kw

    with caplog.at_level(logging.WARNING):
        a, b = _both(*flux, "a cat", height=64, width=64, num_inference_steps=2, output_type="latent",
                     callback_on_step_end=cb, runtime=False)
    assert "callback_on_step_end not handled" in caplog.text and seen == [0, 1, 0, 1]
    assert _rel(a.images, b.images) < TOL
    with pytest.raises(TypeError):  # not a FluxPipeline argument: diffusers' own error
        flux[1]("a cat", prompt_3="x", num_inference_steps=1)


def test_stochastic_scheduler_refused_then_falls_back(dit_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    p = DiffusionPipeline.from_pretrained(dit_dirs["sd3"])
    p.set_progress_bar_config(disable=True)
    p.scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    with pytest.raises(TrtkitError, match="stochastic_sampling"):
        trtkit.accelerate(p)
    p.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    trtkit.accelerate(p)
    p.scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    with caplog.at_level(logging.WARNING):
        p("a", height=64, width=64, num_inference_steps=1, output_type="latent")
    assert "running diffusers' own loop" in caplog.text
    with pytest.raises(TrtkitError, match="somewhere has no transformer.plan"):
        trtkit.accelerate(p, engines="somewhere")


def test_replaced_transformer_is_picked_up(dit_dirs: dict[str, Path], one_torch_thread: None) -> None:
    from diffusers import FluxTransformer2DModel

    ref, acc = _pair(dit_dirs["flux"])
    torch.manual_seed(5)
    other = FluxTransformer2DModel(**dict(ref.transformer.config))
    ref.transformer = other
    acc.transformer = other
    a, b = _both(ref, acc, "a cat", height=64, width=64, num_inference_steps=2, output_type="latent")
    assert acc._trtkit.executor.transformer is other
    assert _rel(a.images, b.images) < TOL


def test_bfloat16_pipeline_on_cpu(dit_dirs: dict[str, Path], one_torch_thread: None) -> None:
    """`from_pretrained(..., dtype=torch.bfloat16)` on a CPU: the loop's numpy buffers hold bf16 bits
    (numpy has no bfloat16). diffusers rounds the latents to bf16 after every step, the runtime keeps them in
    float32 (as the GPU kernel does): equal to bf16 rounding, not bit for bit."""
    from diffusers import DiffusionPipeline

    ref, acc = (DiffusionPipeline.from_pretrained(dit_dirs["flux"], dtype=torch.bfloat16) for _ in range(2))
    for p in (ref, acc):
        p.set_progress_bar_config(disable=True)
    trtkit.accelerate(acc)
    a, b = _both(ref, acc, "a cat", height=48, width=64, num_inference_steps=2, output_type="latent")
    assert b.images.dtype == torch.bfloat16
    assert _rel(a.images.float(), b.images.float()) < 2e-2


@pytest.mark.parametrize("family,nipp", [("flux", 2), ("sd3", 2), ("flux", 0), ("sd3", 0)])
def test_calls_diffusers_fails_on_fail_alike(family: str, nipp: int, flux: tuple[Any, Any], sd3: tuple[Any, Any]
                                            ) -> None:
    """diffusers' encode_prompt does not repeat given prompt_embeds for num_images_per_prompt, while its latents
    are made for batch x num_images_per_prompt, so its call fails; and num_images_per_prompt=0 fails in it too.
    The runtime must not quietly make other images (it returned 2 where 4 were asked for, and an empty batch):
    it leaves such calls to diffusers, error included."""
    ref, acc = flux if family == "flux" else sd3
    cfg = ref.transformer.config
    g = torch.Generator().manual_seed(1)
    pe, pooled = torch.randn(2, 8, cfg.joint_attention_dim, generator=g), torch.randn(2, cfg.pooled_projection_dim)
    kw: dict[str, Any] = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, num_images_per_prompt=nipp, height=32,
                              width=32, num_inference_steps=1, output_type="latent", guidance_scale=1.0)
    if nipp == 0:
        kw = {k: v for k, v in kw.items() if "prompt_embeds" not in k} | {"prompt": "a cat"}
    with pytest.raises(RuntimeError) as want:
        ref(**kw)
    with pytest.raises(RuntimeError) as got:
        acc(**kw)
    assert str(got.value) == str(want.value)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_recapture_on_gpu_gives_diffusers_latents(dit_dirs: dict[str, Path], family: str) -> None:
    """One accelerated pipeline on a GPU called as a user does: a size, another size and batch, the first size
    again with a new seed. Every call's latents are diffusers' own loop's (float32, TF32 off: 1e-4 of the
    range), so a graph captured for an earlier shape is never replayed on a later one."""
    from diffusers import DiffusionPipeline

    p = DiffusionPipeline.from_pretrained(dit_dirs[family]).to("cuda")
    p.set_progress_bar_config(disable=True)
    pipe = trtkit.accelerate(p)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for seed, h, w, n in [(1, 64, 64, 1), (2, 48, 96, 2), (3, 64, 64, 1)]:
            kw = dict(prompt="a cat", num_inference_steps=3, height=h, width=w, num_images_per_prompt=n,
                      output_type="latent")
            want = pipe._trtkit.original_call(pipe, generator=torch.Generator().manual_seed(seed), **kw).images
            pipe.__dict__.pop("_trtkit_timings_ms", None)
            got = pipe(generator=torch.Generator().manual_seed(seed), **kw).images
            assert "_trtkit_timings_ms" in pipe.__dict__ and got.shape == want.shape
            assert _rel(want.float().cpu(), got.float().cpu()) < 1e-4, (seed, h, w)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    assert pipe._trtkit.runner.captures >= 2


@pytest.mark.parametrize("family,kw,said", [
    ("flux", {"true_cfg_scale": 4.0, "negative_prompt": "blurry"}, "true_cfg_scale not handled"),
    ("sd3", {"skip_guidance_layers": [0]}, "skip_guidance_layers not handled"),
    ("sd3", {"scheduler": "FlowMatchHeunDiscreteScheduler"}, "FlowMatchHeunDiscreteScheduler has no device tables"),
])
def test_what_the_loop_does_not_do_is_diffusers(family: str, kw: dict[str, Any], said: str, flux: tuple[Any, Any],
                                                sd3: tuple[Any, Any], caplog: pytest.LogCaptureFixture) -> None:
    """FLUX's true CFG, SD3's skip-layer guidance and a scheduler swapped in after accelerate(): diffusers' own
    loop runs, with one warning line naming what, and gives diffusers' latents."""
    import diffusers

    pair, kw = flux if family == "flux" else sd3, dict(kw)
    old = [p.scheduler for p in pair]
    if "scheduler" in kw:
        for p in pair:
            p.scheduler = getattr(diffusers, kw["scheduler"]).from_config(p.scheduler.config)
        del kw["scheduler"]
    try:
        with caplog.at_level(logging.WARNING):
            a, b = _both(*pair, "a cat", height=32, width=32, num_inference_steps=2, output_type="latent",
                         runtime=False, **kw)
    finally:
        for p, s in zip(pair, old, strict=True):
            p.scheduler = s
    assert said in caplog.text and "running diffusers' own loop" in caplog.text
    assert _rel(a.images, b.images) < TOL


@pytest.mark.parametrize("family,kw", [
    ("flux", {"height": 50, "width": 70}),  # not multiples of 16: diffusers rounds down (48x64), and so does the loop
    ("flux", {"num_images_per_prompt": 2, "generator": "list"}),
    ("flux", {"latents": (1, 12, 16)}),  # 48x64: 3x4 packed tokens of 4x2x2 channels
    ("sd3", {"prompt": ["a", "b"], "generator": "list"}),
    ("sd3", {"latents": (1, 4, 6, 8)}),
])
def test_sizes_generators_and_latents_in(family: str, kw: dict[str, Any], flux: tuple[Any, Any],
                                         sd3: tuple[Any, Any]) -> None:
    kw = {"prompt": "a cat", "height": 48, "width": 64, "num_inference_steps": 2, "output_type": "latent"} | kw
    out = []
    for p in flux if family == "flux" else sd3:
        if kw.get("generator") == "list":
            call = kw | {"generator": [torch.Generator().manual_seed(i) for i in (1, 2)]}
        elif "latents" in kw:
            call = kw | {"latents": torch.randn(*kw["latents"], generator=torch.Generator().manual_seed(3))}
        else:
            call = kw | {"generator": torch.Generator().manual_seed(0)}
        p.__dict__.pop("_trtkit_timings_ms", None)
        out.append(p(**call).images)
    assert "_trtkit_timings_ms" in (flux if family == "flux" else sd3)[1].__dict__
    assert out[0].shape == out[1].shape and _rel(out[0], out[1]) < TOL
