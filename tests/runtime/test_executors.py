"""TorchExecutor's kernel choices: other kernels, the same UNet function (CPU float32 vs plain torch; GPU fp16
through one captured graph)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trtkit.errors import TrtkitError
from trtkit.runtime.executors import LoopShape, TorchExecutor
from trtkit.runtime.kernel_choices import KERNEL_PRESETS, describe_options, kernel_options

SHAPE = LoopShape(1, 4, 16, 16, True, 77, 64, 32, 6)


def _unet(model_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model_dir / "unet").to(device, dtype).eval()


def _noise_pred(ex: TorchExecutor, shape: LoopShape = SHAPE) -> np.ndarray:
    rng = np.random.default_rng(0)
    bufs = {k: rng.standard_normal(s).astype(np.float32) for k, (s, _) in shape.unet_io().items()}
    bufs["timestep"][0] = 500.0
    ex.check_shape(shape)
    ex.bind(bufs)
    ex(0)
    return bufs["noise_pred"].copy()


def test_kernel_choices_keep_the_function(tiny_model_dir: Path) -> None:
    plain = _noise_pred(TorchExecutor(_unet(tiny_model_dir)))
    tuned = _noise_pred(TorchExecutor(_unet(tiny_model_dir), channels_last=True, cudnn_benchmark=True,
                                      attention="math", fuse_qkv=True))
    np.testing.assert_allclose(tuned, plain, rtol=1e-4, atol=1e-4 * np.abs(plain).max())


@pytest.mark.parametrize("hw", [(16, 16), (13, 16)])
def test_every_eager_choice_keeps_the_function(tiny_model_dir: Path, hw: tuple[int, int]) -> None:
    """The pure-torch part of the tuned preset on the CPU (the Triton kernels have their own tests). Latent 13x16
    (104x128): not a multiple of the UNet's upsampling factor; check_shape takes it on every device."""
    from trtkit.runtime import geglu

    shape = LoopShape(1, 4, *hw, True, 77, 64, 32, 6)
    plain = _noise_pred(TorchExecutor(_unet(tiny_model_dir)), shape)
    tuned = _noise_pred(TorchExecutor(_unet(tiny_model_dir), channels_last=True, nhwc_transformer=True,
                                      fuse_qkv=True, fused_geglu=geglu.available()), shape)
    np.testing.assert_allclose(tuned, plain, rtol=1e-4, atol=1e-4 * np.abs(plain).max())


def _storage_bytes(module: torch.nn.Module) -> int:
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}.values())


def test_fuse_qkv_keeps_one_copy_of_the_weights(tiny_model_dir: Path) -> None:
    """diffusers' fuse_qkv_projections() keeps the unfused weights beside the fused ones; trtkit's views them."""
    unet = _unet(tiny_model_dir)
    before = _storage_bytes(unet)
    want = _noise_pred(TorchExecutor(_unet(tiny_model_dir)))
    ex = TorchExecutor(unet, fuse_qkv=True)
    assert any(getattr(m, "fused_projections", False) for m in unet.modules())
    assert _storage_bytes(unet) == before
    np.testing.assert_allclose(_noise_pred(ex), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    unet.unfuse_qkv_projections()  # the unfused path reads the views: the same function
    np.testing.assert_allclose(_noise_pred(TorchExecutor(unet)), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_cudnn_benchmark_is_scoped_to_the_call(tiny_model_dir: Path) -> None:
    before = torch.backends.cudnn.benchmark
    _noise_pred(TorchExecutor(_unet(tiny_model_dir), cudnn_benchmark=True))
    assert torch.backends.cudnn.benchmark == before


def test_unknown_attention_backend_is_a_one_line_error(tiny_model_dir: Path) -> None:
    with pytest.raises(TrtkitError, match="unknown attention backend 'fast'") as e:
        TorchExecutor(_unet(tiny_model_dir), attention="fast")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw, msg", [
    ({"compile_options": {"conv_1x1_as_mm": True}}, "need compile=True"),
    ({"compile": True, "compile_mode": "max-autotune", "compile_options": {"conv_1x1_as_mm": True}}, "not both"),
    ({"compile": True, "compile_options": {"no_such_option": 1}}, "Unexpected optimization option no_such_option$"),
])
def test_bad_compile_options_are_one_line_errors(tiny_model_dir: Path, kw: dict, msg: str) -> None:
    with pytest.raises(TrtkitError, match=msg) as e:
        TorchExecutor(_unet(tiny_model_dir), **kw)
    assert "\n" not in str(e.value)


def test_describe_options() -> None:
    opts = {"channels_last": True, "cudnn_benchmark": False, "attention": "cudnn", "compile_options": {}}
    assert describe_options(opts) == "channels_last,attention=cudnn"
    assert describe_options({"fuse_qkv": True, "compile_options": {"conv_1x1_as_mm": True}}, "+") == \
        "fuse_qkv+conv_1x1_as_mm"
    assert describe_options({}) == ""


def test_kernel_presets() -> None:
    assert kernel_options("tuned", "cpu", False) == {} and kernel_options("tuned", "cpu", True) == {}
    assert kernel_options("plain", "cuda", False) == {} and kernel_options("plain", "cuda", True) == {}
    tuned = kernel_options("tuned", "cuda", False)
    assert tuned.items() <= KERNEL_PRESETS["tuned"]["eager"].items() and tuned["channels_last"]
    # under torch.compile: no hand-written kernels (Inductor fuses GroupNorm and GEGLU), the layout still helps
    assert kernel_options("tuned", "cuda", True) == {"channels_last": True, "nhwc_transformer": True,
                                                     "fuse_qkv": True}
    with pytest.raises(TrtkitError, match="unknown kernel preset 'x'"):
        kernel_options("x", "cuda", False)


def _gpu_loop(model_dir: Path, steps: int, hw: tuple[int, int] = (32, 32)
              ) -> tuple[LoopShape, Any, np.ndarray, dict[str, torch.Tensor]]:
    """A 256x256 (latent `hw`) CFG loop of the tiny SDXL-like model: shape, Euler tables, initial latents, conditioning."""
    from diffusers import EulerDiscreteScheduler

    from trtkit.runtime.pipeline import initial_latents
    from trtkit.runtime.schedulers import make_scheduler, make_tables

    sched = EulerDiscreteScheduler.from_pretrained(model_dir / "scheduler")
    tab = make_tables(make_scheduler("euler", sched.config), steps, "euler")
    shape = LoopShape(1, 4, *hw, True, 77, 64, 32, 6)
    g = torch.Generator().manual_seed(0)
    cond = {"encoder_hidden_states": torch.randn(2, 77, 64, generator=g), "text_embeds": torch.randn(2, 32,
            generator=g), "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2)}
    return shape, tab, initial_latents(shape, tab, 0), cond


@pytest.mark.gpu
@pytest.mark.parametrize("hw", [(32, 32), (65, 64)])
def test_tuned_executor_graph_equals_eager_and_plain(tiny_model_dir: Path, hw: tuple[int, int]) -> None:
    """fp16 on the GPU: with every kernel choice on, the loop as one graph is bit-identical to the same
    executor's eager loop, and close to the plain executor (other kernels, other rounding). Latent 65x64
    (520x512): not a multiple of the UNet's upsampling factor, which the executor refused before."""
    from trtkit.runtime.graph_runner import LoopRunner

    shape, tab, x, cond = _gpu_loop(tiny_model_dir, 10, hw)
    out = {}
    every = {"channels_last": True, "cudnn_benchmark": True, "fuse_qkv": True, "nhwc_group_norm": True,
             "nhwc_transformer": True, "fused_geglu": True}
    for name, opts in {"plain": {}, "tuned": every}.items():
        ex = TorchExecutor(_unet(tiny_model_dir, "cuda", torch.float16), **opts)
        eager = LoopRunner(ex, device="cuda", use_graph=False)(shape, tab, x_init=x, guidance=6.0, **cond)
        graph = LoopRunner(ex, device="cuda", use_graph=True)(shape, tab, x_init=x, guidance=6.0, **cond)
        np.testing.assert_array_equal(graph, eager)
        out[name] = graph
    err = np.abs(out["tuned"] - out["plain"]).max() / np.abs(out["plain"]).max()
    assert err < 2e-2, err


@pytest.mark.gpu
def test_compiled_tuned_preset_under_one_graph(tiny_model_dir: Path) -> None:
    """The compiled preset (channels_last weights, torch.compile with Inductor settings): one graph of the loop
    equals its eager loop, and stays close to the plain eager UNet."""
    from trtkit.runtime.graph_runner import LoopRunner

    shape, tab, x, cond = _gpu_loop(tiny_model_dir, 6)
    plain = LoopRunner(TorchExecutor(_unet(tiny_model_dir, "cuda", torch.float16)), device="cuda",
                       use_graph=True)(shape, tab, x_init=x, guidance=6.0, **cond)
    ex = TorchExecutor(_unet(tiny_model_dir, "cuda", torch.float16), compile=True,
                       compile_options={"conv_1x1_as_mm": True}, **kernel_options("tuned", "cuda", True))
    eager = LoopRunner(ex, device="cuda", use_graph=False)(shape, tab, x_init=x, guidance=6.0, **cond)
    graph = LoopRunner(ex, device="cuda", use_graph=True)(shape, tab, x_init=x, guidance=6.0, **cond)
    np.testing.assert_array_equal(graph, eager)
    err = np.abs(graph - plain).max() / np.abs(plain).max()
    assert err < 2e-2, err
