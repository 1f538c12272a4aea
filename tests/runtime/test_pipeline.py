"""The eager loop with the torch executor on the CPU against the diffusers pipeline itself (tiny SDXL)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trtkit.errors import TrtkitError
from trtkit.runtime.executors import LoopShape
from trtkit.runtime.graph_runner import LoopRunner
from trtkit.runtime.pipeline import Pipeline, RunConfig, encode, initial_latents, run
from trtkit.runtime.schedulers import draw_noise, make_scheduler


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> Pipeline:
    return Pipeline(tiny_model_dir, device="cpu", cuda_graph=False)


@pytest.mark.parametrize("name", ["euler", "euler_a", "ddim", "dpmpp_2m"])
def test_loop_matches_diffusers_pipeline(pipe: Pipeline, name: str) -> None:
    """Same embeddings, same initial latents, same ancestral noise: diffusers' own pipeline call and our
    loop give the same final latents (float32 on the CPU; measured max rel err ~1e-6)."""
    p = pipe.pipe
    steps, g = 6, 5.0
    p.scheduler = make_scheduler(name, p.scheduler.config)
    tables = pipe.tables(name, steps)
    cond, shape = encode(p, "a red cube", "blurry", True, 128, 128, "cpu")
    x = initial_latents(shape, tables, seed=1)
    noise = draw_noise(tables, shape.latent, seed=2)
    ours = pipe.runner(shape, tables, x_init=x, guidance=g, noise=noise, **cond)
    npe, pe = cond["encoder_hidden_states"].chunk(2)
    npooled, pooled = cond["text_embeds"].chunk(2)
    with torch.no_grad():
        ref = p(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=npooled, num_inference_steps=steps, guidance_scale=g,
                height=128, width=128, latents=torch.from_numpy(x / np.float32(tables.init_noise_sigma)),
                generator=torch.Generator("cpu").manual_seed(2), output_type="latent").images.numpy()
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 1e-4, f"{name}: rel err {err:.2e}"


def test_run_writes_png(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "img.png"
    r = run(RunConfig(model_dir=tiny_model_dir, prompt="x", steps=3, device="cpu", height=128, width=128,
                      scheduler="dpmpp_2m"), out)
    from PIL import Image

    assert Image.open(out).size == (128, 128) and np.isfinite(r.latents).all()


def test_torch_executor_interface(pipe: Pipeline) -> None:
    """bind once, call many times: reads the bound inputs, writes noise_pred in place (no new buffers)."""
    ex = pipe.executor
    shape = LoopShape(1, 4, 16, 16, True, 77, 64, 32, 6)
    ex.check_shape(shape)
    rng = np.random.default_rng(0)
    bufs = {k: rng.standard_normal(s).astype(np.float32) for k, (s, _) in shape.unet_io().items()}
    bufs["timestep"][0] = 500.0
    ex.bind(bufs)
    ptr = bufs["noise_pred"].ctypes.data
    ex(0)
    with torch.no_grad():
        want = pipe.pipe.unet(torch.from_numpy(bufs["sample"]), torch.tensor(500.0),
                              encoder_hidden_states=torch.from_numpy(bufs["encoder_hidden_states"]),
                              added_cond_kwargs={"text_embeds": torch.from_numpy(bufs["text_embeds"]),
                                                 "time_ids": torch.from_numpy(bufs["time_ids"])}).sample
    assert bufs["noise_pred"].ctypes.data == ptr
    np.testing.assert_allclose(bufs["noise_pred"], want.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(latent_channels=3), "in_channels"), (dict(text_dim=77), "cross_attention_dim"),
    (dict(pooled_dim=None), "added conditions"), (dict(pooled_dim=40), "added features"),
])
def test_shape_checks_are_one_line_errors(pipe: Pipeline, bad: dict, match: str) -> None:
    base = dict(batch=1, latent_channels=4, latent_height=16, latent_width=16, cfg=True, text_len=77, text_dim=64,
                pooled_dim=32, time_ids_dim=6)
    with pytest.raises(TrtkitError, match=match) as e:
        LoopRunner(pipe.executor, device="cpu").prepare(LoopShape(**{**base, **bad}),
                                                         pipe.tables("euler", 4))
    assert "\n" not in str(e.value)


def test_latent_not_a_multiple_of_8_is_accepted(pipe: Pipeline) -> None:
    """Latent 12x9 (96x72 pixels): diffusers' UNet takes it (it passes the skip sizes to its upsamplers); the
    torch executor used to refuse it ("image size a multiple of 64"). test_accelerate_calls.py compares latents."""
    shape = LoopShape(batch=1, latent_channels=4, latent_height=12, latent_width=9, cfg=True, text_len=77,
                      text_dim=64, pooled_dim=32, time_ids_dim=6)
    LoopRunner(pipe.executor, device="cpu").prepare(shape, pipe.tables("euler", 4))


def test_set_inputs_shape_error(pipe: Pipeline) -> None:
    r = LoopRunner(pipe.executor, device="cpu")
    with pytest.raises(TrtkitError, match="prepare"):
        r.set_inputs(guidance=2.0)


def test_bad_run_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrtkitError, match="model_index"):
        run(RunConfig(model_dir=tmp_path, prompt="x", device="cpu"))
    with pytest.raises(TrtkitError, match="unknown scheduler"):
        run(RunConfig(model_dir=tiny_model_dir, prompt="x", device="cpu", scheduler="lms", steps=2))
    with pytest.raises(TrtkitError, match="multiples of 8"):
        run(RunConfig(model_dir=tiny_model_dir, prompt="x", device="cpu", height=100, width=128, steps=2))
    with pytest.raises(TrtkitError, match="must end in"):
        run(RunConfig(model_dir=tiny_model_dir, prompt="x", device="cpu", steps=1, height=64, width=64),
            tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists()
