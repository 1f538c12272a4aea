"""`decoding.vae_input` (the latents -> VAE-input arithmetic both the torch and the TensorRT VAE use) against
diffusers' own: a tiny SDXL / SD 1.5 pipeline whose VAE has per-channel latents_mean / latents_std, its
`vae.decode` wrapped to record what the pipeline hands it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from test_scheduler_parity import SD_BETAS, make_pipeline, tiny_modules

from trtkit.runtime.decoding import vae_input


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from trtkit.tiny import _write_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    _write_tokenizer(folder)
    return folder


def _vae(**stats: Any) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(5)
    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                         layers_per_block=1, scaling_factor=0.13025, **stats).eval()


def _diffusers_vae_input(arch: str, tok: Any, vae: Any) -> tuple[np.ndarray, np.ndarray]:
    """(the final latents, what diffusers handed vae.decode) for one 2-step 64x48 run."""
    from diffusers import EulerDiscreteScheduler

    pipe = make_pipeline(arch, {**tiny_modules(arch, tok), "vae": vae}, EulerDiscreteScheduler(**SD_BETAS))
    seen: dict[str, np.ndarray] = {}
    decode = vae.decode

    def record(z: torch.Tensor, *a: Any, **kw: Any) -> Any:
        seen["z"] = z.detach().float().numpy().copy()
        return decode(z, *a, **kw)

    def last(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
        seen["latents"] = kw["latents"].detach().float().numpy().copy()
        return kw

    vae.decode = record
    with torch.no_grad():
        pipe("a red cube", num_inference_steps=2, height=64, width=48, output_type="np",
             generator=torch.Generator().manual_seed(3), callback_on_step_end=last)
    return seen["latents"], seen["z"]


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_vae_input_is_diffusers_arithmetic(tok: Any, arch: str) -> None:
    """SDXL's pipeline denormalizes with latents_mean/std; SD 1.5's ignores them (scaling_factor only)."""
    vae = _vae(latents_mean=[0.5, -0.3, 0.2, 0.1], latents_std=[2.0, 1.5, 0.5, 1.0])
    latents, want = _diffusers_vae_input(arch, tok, vae)
    got = vae_input(latents, vae.config, sdxl=arch == "sdxl")
    assert got.dtype == np.float32 and got.shape == want.shape == (1, 4, 8, 6)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    plain = latents / np.float32(0.13025)
    assert (np.abs(got - plain).max() > 0.1) == (arch == "sdxl")  # the statistics matter where diffusers uses them


def test_vae_input_without_statistics(tok: Any) -> None:
    vae = _vae()
    latents, want = _diffusers_vae_input("sdxl", tok, vae)
    np.testing.assert_allclose(vae_input(latents, vae.config, sdxl=True), want, rtol=1e-6, atol=1e-6)
