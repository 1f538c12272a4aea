"""`trtkit.accelerate(StableDiffusion(XL)ControlNetPipeline)`: diffusers' latents for the same call and seed (issue
16). Each test runs one call on a plain diffusers pipeline and on an accelerated one built from the same tiny
random-weight modules (test_scheduler_parity.tiny_modules) plus ControlNets made with ControlNetModel.from_unet
whose zero convolutions are perturbed: a fresh ControlNet's residuals are exactly zero, which would make every
comparison here pass with the ControlNet ignored (test_controlnet_changes_the_latents checks they matter).

Tolerance as the scheduler parity suite: max |ours - diffusers| / max |diffusers| < 1e-4 (float32, CPU)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from test_scheduler_parity import SD_BETAS, tiny_modules

import trtkit
from trtkit.errors import TrtkitError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/runtime/conftest.py
TOL = 1e-4


def tiny_controlnet(unet: Any, seed: int, global_pool_conditions: bool = False) -> Any:
    """ControlNetModel.from_unet with its zero convolutions (the down / mid residual convs and the conditioning
    embedding's last conv) given seeded random weights, so its residuals are not zero."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 4, 8, 8)).eval()
    net.register_to_config(global_pool_conditions=global_pool_conditions)  # from_unet does not take it
    g = torch.Generator().manual_seed(seed)
    zero = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero:
            for p in conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


@pytest.fixture(scope="module")
def mods(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    from trtkit.tiny import _write_tokenizer

    tok = tmp_path_factory.mktemp("tok")
    _write_tokenizer(tok)
    out = {arch: tiny_modules(arch, tok) for arch in ("sd15", "sdxl")}
    for m in out.values():
        m["nets"] = [tiny_controlnet(m["unet"], seed) for seed in (10, 11)]
        m["pooled_net"] = tiny_controlnet(m["unet"], 12, global_pool_conditions=True)
    return out


def make_cn_pipeline(arch: str, mods: dict[str, Any], controlnet: Any, scheduler: Any) -> Any:
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    m = {k: v for k, v in mods.items() if k not in ("nets", "pooled_net")}
    if arch == "sd15":
        p = StableDiffusionControlNetPipeline(scheduler=scheduler, controlnet=controlnet, safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False, **m)
    else:
        p = StableDiffusionXLControlNetPipeline(scheduler=scheduler, controlnet=controlnet, add_watermarker=False,
                                                **m)
    p.set_progress_bar_config(disable=True)
    return p


def pair(arch: str, mods: dict[str, dict[str, Any]], n: int = 1, cls: str = "EulerDiscreteScheduler",
         pooled: bool = False) -> tuple[Any, Any]:
    """(plain diffusers, accelerated): same modules; n > 1 makes a MultiControlNetModel of the first n nets."""
    import diffusers
    from diffusers import MultiControlNetModel

    nets = [mods[arch]["pooled_net"]] if pooled else mods[arch]["nets"][:n]
    out = []
    for _ in range(2):
        cn = nets[0] if n == 1 else MultiControlNetModel(nets)
        out.append(make_cn_pipeline(arch, mods[arch], cn, getattr(diffusers, cls)(**SD_BETAS)))
    return out[0], trtkit.accelerate(out[1])


def pil_image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def tensor_image(seed: int, h: int = 64, w: int = 64) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(3)


def latents(r: Any) -> np.ndarray:
    return (r.images if hasattr(r, "images") else r[0]).float().numpy()


def same(plain: Any, acc: Any, caplog: Any, *args: Any, **kw: Any) -> np.ndarray:
    """The call on both pipelines (same generator seed); the accelerated one must not fall back to diffusers."""
    want = latents(plain(*args, generator=gen(), **kw))
    with caplog.at_level(logging.WARNING):
        got = latents(acc(*args, generator=gen(), **kw))
    assert "running diffusers' own loop" not in caplog.text
    assert got.shape == want.shape
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < TOL, err
    return got


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_defaults_left_unset(mods, caplog, arch: str) -> None:  # type: ignore[no-untyped-def]
    """prompt + image only: the size is the image's (not the UNet's sample_size), the steps and guidance are the
    pipeline's defaults (50; 7.5 SD, 5.0 SDXL)."""
    plain, acc = pair(arch, mods)
    got = same(plain, acc, caplog, prompt="a red cube", image=pil_image(0, (64, 48)), output_type="latent")
    assert got.shape == (1, 4, 6, 8)


def test_positional_arguments(mods, caplog) -> None:  # type: ignore[no-untyped-def]
    """pipe(prompt, image, height, width, steps) as diffusers' signature allows; the image is resized."""
    plain, acc = pair("sd15", mods)
    got = same(plain, acc, caplog, "a red cube", pil_image(1), 64, 128, 3, output_type="latent")
    assert got.shape == (1, 4, 8, 16)


@pytest.mark.parametrize("arch,cls", [("sd15", "EulerAncestralDiscreteScheduler"), ("sdxl", "DDIMScheduler")])
def test_tensor_image_scale_and_guidance_window(mods, caplog, arch: str, cls: str) -> None:  # type: ignore[no-untyped-def]
    """A tensor image, a float scale and control_guidance_start / end (the ControlNet off outside 20%-70% of the
    steps: the keep table); ancestral noise on SD."""
    plain, acc = pair(arch, mods, cls=cls)
    same(plain, acc, caplog, prompt=["a red cube", "a cat"], image=tensor_image(2), num_inference_steps=5,
         controlnet_conditioning_scale=0.6, control_guidance_start=0.2, control_guidance_end=0.7,
         guidance_scale=6.0, output_type="latent")


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("scale", [[0.5, 1.3], 0.8])
def test_multi_controlnet(mods, caplog, arch: str, scale: Any) -> None:  # type: ignore[no-untyped-def]
    """Two ControlNets (MultiControlNetModel): a list of images (PIL and tensor), a list of scales or one float,
    per-net guidance windows; residuals summed."""
    plain, acc = pair(arch, mods, n=2)
    same(plain, acc, caplog, prompt="a red cube", image=[pil_image(3), tensor_image(4)], num_inference_steps=4,
         controlnet_conditioning_scale=scale, control_guidance_start=[0.0, 0.25], control_guidance_end=[1.0, 0.75],
         num_images_per_prompt=2, output_type="latent")


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_guess_mode(mods, caplog, arch: str) -> None:  # type: ignore[no-untyped-def]
    """guess_mode=True: the ControlNet sees only the conditional half, the unconditional half gets zeros, and its
    residuals are scaled 0.1 .. 1 (diffusers' logspace); supported."""
    plain, acc = pair(arch, mods)
    same(plain, acc, caplog, prompt="a red cube", image=pil_image(5), num_inference_steps=3, guess_mode=True,
         controlnet_conditioning_scale=0.9, output_type="latent")


def test_global_pool_conditions(mods, caplog) -> None:  # type: ignore[no-untyped-def]
    """A ControlNet with global_pool_conditions (shuffle-style): guess mode forced, residuals averaged."""
    plain, acc = pair("sd15", mods, pooled=True)
    same(plain, acc, caplog, prompt="a red cube", image=pil_image(6), num_inference_steps=3, output_type="latent")


def test_controlnet_changes_the_latents(mods) -> None:  # type: ignore[no-untyped-def]
    """The comparisons above are not vacuous: scale 0 vs 1 moves the latents by more than 100x the tolerance."""
    _, acc = pair("sd15", mods)
    kw: dict[str, Any] = dict(prompt="a red cube", image=pil_image(7), num_inference_steps=3, output_type="latent")
    a = latents(acc(**kw, generator=gen()))
    b = latents(acc(**kw, generator=gen(), controlnet_conditioning_scale=0.0))
    assert np.abs(a - b).max() / np.abs(b).max() > 100 * TOL


def test_new_image_and_scale_reuse_the_loop(mods, caplog) -> None:  # type: ignore[no-untyped-def]
    """A second call with another image and scale writes them into the same loop buffers (no new loop, which on a
    GPU is no new capture) and still gives diffusers' latents."""
    plain, acc = pair("sd15", mods)
    kw: dict[str, Any] = dict(prompt="a red cube", num_inference_steps=3, output_type="latent")
    same(plain, acc, caplog, image=pil_image(8), controlnet_conditioning_scale=1.0, **kw)
    loop = acc._trtkit.runner.loop
    same(plain, acc, caplog, image=pil_image(9), controlnet_conditioning_scale=0.4, **kw)
    assert acc._trtkit.runner.loop is loop


def test_pil_output(mods, caplog) -> None:  # type: ignore[no-untyped-def]
    """The default output (PIL through the VAE) is diffusers' image."""
    plain, acc = pair("sd15", mods)
    kw: dict[str, Any] = dict(prompt="a red cube", image=pil_image(10), num_inference_steps=2)
    want = np.asarray(plain(**kw, generator=gen()).images[0], np.int16)
    got = np.asarray(acc(**kw, generator=gen()).images[0], np.int16)
    assert np.abs(got - want).max() <= 1


def test_unhandled_argument_runs_diffusers(mods, caplog) -> None:  # type: ignore[no-untyped-def]
    """An argument the runtime does not reproduce (eta) runs diffusers' own loop, with a warning: the same
    image, never a different one."""
    plain, acc = pair("sd15", mods)
    kw: dict[str, Any] = dict(prompt="a red cube", image=pil_image(11), num_inference_steps=2, eta=0.5,
                              output_type="latent")
    want = latents(plain(**kw, generator=gen()))
    with caplog.at_level(logging.WARNING):
        got = latents(acc(**kw, generator=gen()))
    assert "eta not handled by the runtime" in caplog.text
    np.testing.assert_array_equal(got, want)


def test_missing_image_gets_diffusers_error(mods) -> None:  # type: ignore[no-untyped-def]
    plain, acc = pair("sd15", mods)
    with pytest.raises(Exception) as want:
        plain(prompt="a red cube", num_inference_steps=2, output_type="latent")
    with pytest.raises(Exception) as got:
        acc(prompt="a red cube", num_inference_steps=2, output_type="latent")
    assert type(got.value) is type(want.value) and str(got.value) == str(want.value)


def test_engines_refused(mods, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A TensorRT UNet with ControlNets is not there yet: one line, before anything is loaded."""
    from diffusers import EulerDiscreteScheduler

    pipe = make_cn_pipeline("sd15", mods["sd15"], mods["sd15"]["nets"][0], EulerDiscreteScheduler(**SD_BETAS))
    with pytest.raises(TrtkitError, match="ControlNet pipelines with the torch UNet only"):
        trtkit.accelerate(pipe, engines=tmp_path)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_kernel_options_apply_to_the_controlnets(mods, arch: str) -> None:  # type: ignore[no-untyped-def]
    """The UNet's kernel choices that run without triton on the CPU (fused q/k/v, channels-last weights, the
    channels-last Transformer2D) are applied to each ControlNet too (ControlNetModel has fuse_qkv_projections), and
    the loop gives the plain executor's latents (deep copies: the options change the modules in place)."""
    import copy

    from diffusers import EulerDiscreteScheduler

    from trtkit.runtime.controlnet import ControlNetExecutor
    from trtkit.runtime.executors import LoopShape
    from trtkit.runtime.graph_runner import LoopRunner
    from trtkit.runtime.pipeline import initial_latents
    from trtkit.runtime.schedulers import make_tables

    m = mods[arch]
    opts = {"channels_last": True, "fuse_qkv": True, "nhwc_transformer": True}
    sdxl = arch == "sdxl"
    tab = make_tables(EulerDiscreteScheduler(**SD_BETAS), 3)
    shape = LoopShape(1, 4, 8, 8, True, 77, 16, 16 if sdxl else None, 6 if sdxl else None)
    g = torch.Generator().manual_seed(0)
    inputs: dict[str, Any] = {"x_init": initial_latents(shape, tab, 0), "guidance": 6.0,
                              "encoder_hidden_states": torch.randn(2, 77, 16, generator=g),
                              "controlnet_cond_0": torch.rand(2, 3, 64, 64, generator=g),
                              "controlnet_cond_1": torch.rand(2, 3, 64, 64, generator=g),
                              "controlnet_scale": np.array([[1.0, 0.5], [0.7, 0.0], [1.2, 0.9]], np.float32)}
    if sdxl:
        inputs.update(text_embeds=torch.randn(2, 16, generator=g), time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
    out = {}
    for name, kw in {"plain": {}, "tuned": opts}.items():
        ex = ControlNetExecutor(copy.deepcopy(m["unet"]), [copy.deepcopy(n) for n in m["nets"]], **kw)
        out[name] = LoopRunner(ex, device="cpu")(shape, tab, **inputs)
    fused = [mod for n in ex.nets for mod in n.modules() if getattr(mod, "fused_projections", False)]
    assert fused and ex.nets[0].conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(out["tuned"] - out["plain"]).max() / np.abs(out["plain"]).max() < 1e-4


def test_controlnet_img2img_refused(mods) -> None:  # type: ignore[no-untyped-def]
    """ControlNet img2img runs another __call__ (strength, init image): refused in one line, not a wrong image."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetImg2ImgPipeline

    m = {k: v for k, v in mods["sd15"].items() if k not in ("nets", "pooled_net")}
    pipe = StableDiffusionControlNetImg2ImgPipeline(scheduler=EulerDiscreteScheduler(**SD_BETAS),
                                                    controlnet=mods["sd15"]["nets"][0], safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False, **m)
    with pytest.raises(TrtkitError, match="StableDiffusionControlNetImg2ImgPipeline runs its own __call__"):
        trtkit.accelerate(pipe)
