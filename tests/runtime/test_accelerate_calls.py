"""`trtkit.accelerate(pipe)` under call forms the scheduler parity suite does not use (found by the 2026-12-02
held-out trial): positional arguments, sizes the runtime refuses, arguments diffusers rejects, SD's safety
checker, an LCM-distilled UNet. Each test runs the user's call on a plain diffusers pipeline and on an
accelerated one built from the same modules: same latents / images, same error, or a one-line refusal."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from test_scheduler_parity import SD_BETAS, make_pipeline, tiny_modules

import trtkit
from trtkit.errors import TrtkitError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/runtime/conftest.py


@pytest.fixture(scope="module")
def mods(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    from trtkit.tiny import _write_tokenizer

    tok = tmp_path_factory.mktemp("tok")
    _write_tokenizer(tok)
    return {arch: tiny_modules(arch, tok) for arch in ("sd15", "sdxl")}


def _pair(arch: str, mods: dict[str, dict[str, Any]], cls: str = "EulerDiscreteScheduler", **extra: Any) -> tuple[Any, Any]:
    """(plain diffusers, accelerated), same modules, same scheduler config."""
    import diffusers

    plain, acc = (make_pipeline(arch, {**mods[arch], **extra}, getattr(diffusers, cls)(**SD_BETAS)) for _ in range(2))
    return plain, trtkit.accelerate(acc)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(3)


def _latents(r: Any) -> np.ndarray:
    return (r.images if hasattr(r, "images") else r[0]).float().numpy()


def test_positional_height_width_steps(mods) -> None:  # type: ignore[no-untyped-def]
    """pipe(prompt, height, width, steps) as diffusers' signature allows: the runtime used to take only the
    prompt and silently run 50 steps at the default size (a different image)."""
    plain, acc = _pair("sd15", mods)
    want = _latents(plain("a red cube", 64, 128, 3, generator=_gen(), output_type="latent"))
    got = _latents(acc("a red cube", 64, 128, 3, generator=_gen(), output_type="latent"))
    assert got.shape == want.shape == (1, 4, 8, 16)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


@pytest.mark.parametrize("arch,cls,height,width", [("sd15", "EulerDiscreteScheduler", 520, 512),
                                                   ("sd15", "EulerDiscreteScheduler", 72, 64),
                                                   ("sdxl", "EulerAncestralDiscreteScheduler", 72, 64)])
def test_size_not_a_multiple_of_64(mods, caplog, arch: str, cls: str, height: int, width: int) -> None:  # type: ignore[no-untyped-def]
    """Multiples of 8 that are not of 64 (latent 65x64, 9x8): diffusers accepts them; the runtime's torch executor
    refused them ("image size a multiple of 64") and accelerate fell back to diffusers' loop. The torch UNet
    (diffusers' own forward) takes them: the runtime's eager loop now runs and gives diffusers' latents."""
    plain, acc = _pair(arch, mods, cls)
    kw: dict[str, Any] = dict(prompt="a red cube", num_inference_steps=3, height=height, width=width,
                              output_type="latent")
    want = _latents(plain(**kw, generator=_gen()))
    with caplog.at_level(logging.WARNING):
        got = _latents(acc(**kw, generator=_gen()))
    assert "running diffusers' own loop" not in caplog.text
    assert got.shape == want.shape == (1, 4, height // 8, width // 8)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("case", ["prompt_and_embeds", "size_not_multiple_of_8", "embeds_without_pooled"])
def test_arguments_diffusers_rejects_get_its_error(mods, arch: str, case: str) -> None:  # type: ignore[no-untyped-def]
    """diffusers' check_inputs runs first: the same ValueError, not an image from half the arguments (SD) or an
    AttributeError traceback from inside encode_prompt (SDXL)."""
    if case == "embeds_without_pooled" and arch == "sd15":
        pytest.skip("SD has no pooled embeddings")
    plain, acc = _pair(arch, mods)
    kw: dict[str, Any] = dict(prompt="a red cube", num_inference_steps=2, height=64, width=64, output_type="latent")
    if case == "prompt_and_embeds":
        kw["prompt_embeds"] = torch.zeros(1, 77, 16)
    elif case == "size_not_multiple_of_8":
        kw.update(height=100, width=100)
    else:
        kw.update(prompt=None, prompt_embeds=torch.zeros(1, 77, 16))
    with pytest.raises(ValueError) as want:
        plain(**kw)
    with pytest.raises(ValueError) as got:
        acc(**kw)
    assert str(got.value) == str(want.value)


def _safety_checker(flag: bool) -> tuple[Any, Any]:
    """A tiny CLIP safety checker whose concept thresholds flag every image (flag) or none."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    v = dict(hidden_size=16, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1, image_size=32,
             patch_size=16)
    t = dict(hidden_size=16, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=100)
    torch.manual_seed(0)
    sc = StableDiffusionSafetyChecker(CLIPConfig(text_config=t, vision_config=v, projection_dim=8)).eval()
    with torch.no_grad():
        sc.concept_embeds_weights.fill_(-1.0 if flag else 1.0)  # cosine - threshold > 0 flags the image
        sc.special_care_embeds_weights.fill_(1.0)
    return sc, CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.mark.parametrize("flag", [True, False])
def test_sd_safety_checker_runs(mods, flag: bool) -> None:  # type: ignore[no-untyped-def]
    """An SD 1.5 folder with its safety checker (runwayml's has one): diffusers blacks out flagged images and
    reports nsfw_content_detected; the accelerated call used to skip the checker and return None."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    sc, fe = _safety_checker(flag)
    pipes = [StableDiffusionPipeline(scheduler=EulerDiscreteScheduler(**SD_BETAS), safety_checker=sc,
                                     feature_extractor=fe, requires_safety_checker=True, **mods["sd15"])
             for _ in range(2)]
    for p in pipes:
        p.set_progress_bar_config(disable=True)
    plain, acc = pipes[0], trtkit.accelerate(pipes[1])
    kw: dict[str, Any] = dict(prompt="a red cube", num_inference_steps=2, height=64, width=64, output_type="np")
    want = plain(**kw, generator=_gen())
    got = acc(**kw, generator=_gen())
    assert got.nsfw_content_detected == want.nsfw_content_detected == [flag]
    assert bool(np.abs(got.images).max() == 0) is flag
    assert np.abs(got.images - want.images).max() < 1e-4
    _, nsfw = acc(**kw, generator=_gen(), return_dict=False)
    assert nsfw == [flag]


def test_lcm_unet_refused(mods) -> None:  # type: ignore[no-untyped-def]
    """A UNet with a guidance embedding (time_cond_proj_dim, LCM distillation): diffusers feeds it w and no CFG
    batch; the runtime would run it without, a different image. One line instead."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=16,
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
                                time_cond_proj_dim=8)
    with pytest.raises(TrtkitError, match="time_cond_proj_dim=8"):
        _pair("sd15", mods, unet=unet)


@pytest.mark.parametrize("cls,arch", [("StableDiffusionXLPAGPipeline", "sdxl"), ("StableDiffusionPAGPipeline", "sd15"),
                                      ("StableDiffusionXLImg2ImgPipeline", "sdxl")])
def test_other_pipeline_classes_refused(mods, cls: str, arch: str) -> None:  # type: ignore[no-untyped-def]
    """Pipelines with a unet and encode_prompt but another __call__: PAG applies pag_scale=3 by default (its
    image was 0.10 / 0.12 away from the accelerated one, with no warning); img2img fell back at every call with a
    warning (no speed-up at all). One line at accelerate() instead."""
    import diffusers
    from diffusers import EulerDiscreteScheduler

    kw = {} if arch == "sdxl" else dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    p = getattr(diffusers, cls)(scheduler=EulerDiscreteScheduler(**SD_BETAS), **mods[arch], **kw)
    with pytest.raises(TrtkitError, match=f"{cls} runs its own __call__"):
        trtkit.accelerate(p)
    assert type(p).__name__ == cls


def test_sdxl_vae_latents_mean_std(mods) -> None:  # type: ignore[no-untyped-def]
    """An SDXL-architecture VAE with per-channel latents_mean / latents_std (Playground v2.5's): diffusers' SDXL
    pipeline denormalizes with them before the VAE; the runtime's decode divided by scaling_factor only (images
    0.45 apart)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(5)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, latents_mean=[0.5, -0.3, 0.2, 0.1], latents_std=[2.0, 1.5, 0.5, 1.0]).eval()
    plain, acc = _pair("sdxl", mods, vae=vae)
    kw: dict[str, Any] = dict(prompt="a red cube", num_inference_steps=2, height=64, width=64, output_type="np")
    want, got = plain(**kw, generator=_gen()).images, acc(**kw, generator=_gen()).images
    assert np.abs(got - want).max() < 1e-4


def test_sdxl_watermark_applied(mods) -> None:  # type: ignore[no-untyped-def]
    """With the invisible-watermark package installed, diffusers' SDXL pipeline watermarks every decoded image
    (pipe.watermark); the accelerated call skipped it. A stand-in watermarker (the package is not installed here)
    shows the call and where it happens (on the VAE output, before postprocess)."""
    class Mark:
        calls = 0

        def apply_watermark(self, images: torch.Tensor) -> torch.Tensor:
            Mark.calls += 1
            return images.flip(-1) * 0.5

    plain, acc = _pair("sdxl", mods)
    plain.watermark = acc.watermark = Mark()
    kw: dict[str, Any] = dict(prompt="a red cube", num_inference_steps=2, height=64, width=64, output_type="np")
    want, got = plain(**kw, generator=_gen()).images, acc(**kw, generator=_gen()).images
    assert Mark.calls == 2 and np.abs(got - want).max() < 1e-4


def test_unet_replaced_after_accelerate(mods) -> None:  # type: ignore[no-untyped-def]
    """`pipe.unet = another_unet` after accelerate() (a fine-tune swapped in): diffusers runs the new UNet; the
    runtime's executor kept the old one (latents 0.46 apart, no warning). It now rebuilds the executor."""
    from diffusers import UNet2DConditionModel

    plain, acc = _pair("sd15", mods)
    torch.manual_seed(11)
    other = UNet2DConditionModel(**dict(mods["sd15"]["unet"].config)).eval()
    plain.unet = acc.unet = other
    kw: dict[str, Any] = dict(prompt="a red cube", num_inference_steps=3, height=64, width=64, output_type="latent")
    want, got = _latents(plain(**kw, generator=_gen())), _latents(acc(**kw, generator=_gen()))
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    assert acc._trtkit.executor.unet is other


def test_pipe_to_fp16_after_accelerate(mods) -> None:  # type: ignore[no-untyped-def]
    """`pipe.to(torch.float16)` after accelerate(): diffusers runs in fp16; the runtime kept the fp32 I/O of the
    executor built at accelerate() and failed with 'mat1 and mat2 must have the same dtype' (a traceback)."""
    import copy

    m = copy.deepcopy(mods["sd15"])  # the module-scoped modules stay fp32 for the other tests
    plain, acc = _pair("sd15", {"sd15": m})
    plain.to(torch.float16)
    acc.to(torch.float16)
    kw: dict[str, Any] = dict(prompt="a red cube", num_inference_steps=3, height=64, width=64, output_type="latent")
    want, got = _latents(plain(**kw, generator=_gen())), _latents(acc(**kw, generator=_gen()))
    assert np.abs(got - want).max() / np.abs(want).max() < 2e-3  # fp16 scheduler math in diffusers, fp32 here


def test_run_cli_sd_folder_with_safety_checker(mods, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`trtkit run` on a saved SD 1.5 folder that has a safety checker (as runwayml's does) and flags the image:
    diffusers gives a black image; `trtkit run` skipped the checker and wrote the image."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from PIL import Image

    from trtkit.cli import main

    sc, fe = _safety_checker(True)
    StableDiffusionPipeline(scheduler=EulerDiscreteScheduler(**SD_BETAS), safety_checker=sc, feature_extractor=fe,
                            requires_safety_checker=True, **mods["sd15"]).save_pretrained(str(tmp_path / "sd15"))
    out = tmp_path / "a.png"
    rc = main(["run", str(tmp_path / "sd15"), "--prompt", "x", "--steps", "2", "--height", "64", "--width", "64",
               "--device", "cpu", "-o", str(out)])
    assert rc == 0 and np.asarray(Image.open(out)).max() == 0
