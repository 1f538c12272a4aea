"""ControlNet + UNet loop on a GPU (fp16, the `tuned` kernels on the ControlNets too): one CUDA graph equals the
same executor's eager loop, and a new conditioning image or scale is a device value (no new capture, the new
image's latents). Tiny modules from test_controlnet.py, on the GPU."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from test_controlnet import SD_BETAS, make_cn_pipeline, mods, pil_image  # noqa: F401  (mods: the fixture)

import trtkit

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("one_torch_thread")]


def _on_gpu(m: dict[str, Any]) -> dict[str, Any]:
    return {k: (copy.deepcopy(v).to("cuda", torch.float16) if isinstance(v, torch.nn.Module) else
                [copy.deepcopy(n).to("cuda", torch.float16) for n in v] if k == "nets" else v)
            for k, v in m.items() if k != "pooled_net"}


def _loop(arch: str, m: dict[str, Any], steps: int) -> tuple[Any, Any, dict[str, Any]]:
    from diffusers import EulerDiscreteScheduler

    from trtkit.runtime.executors import LoopShape
    from trtkit.runtime.pipeline import initial_latents
    from trtkit.runtime.schedulers import make_tables

    tab = make_tables(EulerDiscreteScheduler(**SD_BETAS), steps)
    sdxl = arch == "sdxl"
    shape = LoopShape(1, 4, 8, 8, True, 77, 16, 16 if sdxl else None, 6 if sdxl else None)
    g = torch.Generator().manual_seed(0)
    inputs: dict[str, Any] = {"x_init": initial_latents(shape, tab, 0), "guidance": 6.0,
                              "encoder_hidden_states": torch.randn(2, 77, 16, generator=g)}
    if sdxl:
        inputs.update(text_embeds=torch.randn(2, 16, generator=g), time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
    return shape, tab, inputs


def _controls(seed: int, scales: list[float], steps: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {f"controlnet_cond_{k}": torch.rand(1, 3, 64, 64, generator=g).repeat(2, 1, 1, 1)
                           for k in range(len(scales))}
    out["controlnet_scale"] = np.tile(np.asarray(scales, np.float32), (steps, 1))
    return out


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_graph_equals_eager_new_image_and_scale_without_capture(mods, arch: str) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    from trtkit.runtime.controlnet import ControlNetExecutor
    from trtkit.runtime.graph_runner import LoopRunner
    from trtkit.runtime.kernel_choices import kernel_options

    m = _on_gpu(mods[arch])
    ex = ControlNetExecutor(m["unet"], m["nets"], **kernel_options("tuned", "cuda", False))
    assert ex.options["fuse_qkv"] and ex.net_exs[0].options["channels_last"]  # the ControlNets are tuned too
    steps = 5
    shape, tab, inputs = _loop(arch, m, steps)
    first, second = _controls(1, [1.0, 0.7], steps), _controls(2, [0.4, 1.2], steps)
    eager = LoopRunner(ex, device="cuda", use_graph=False)
    e1 = eager(shape, tab, **inputs, **first)
    e2 = eager(shape, tab, **inputs, **second)
    graph = LoopRunner(ex, device="cuda", use_graph=True)
    g1 = graph(shape, tab, **inputs, **first)
    assert graph.captures == 1
    g2 = graph(shape, tab, **inputs, **second)
    assert graph.captures == 1  # image and scale are device values
    np.testing.assert_array_equal(g1, e1)
    np.testing.assert_array_equal(g2, e2)
    assert np.isfinite(g1).all() and np.abs(g2 - g1).max() / np.abs(g1).max() > 1e-2  # the new control counted


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_accelerate_on_gpu_matches_diffusers(mods, arch: str) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """fp16 on the GPU, tuned kernels and the loop graph against diffusers over the modules as built; a second call
    with another image and scale keeps the captured graph."""
    from diffusers import EulerDiscreteScheduler, MultiControlNetModel

    plain_m, acc_m = _on_gpu(mods[arch]), _on_gpu(mods[arch])
    plain = make_cn_pipeline(arch, plain_m, MultiControlNetModel(plain_m["nets"]), EulerDiscreteScheduler(**SD_BETAS))
    acc = trtkit.accelerate(make_cn_pipeline(arch, acc_m, MultiControlNetModel(acc_m["nets"]),
                                             EulerDiscreteScheduler(**SD_BETAS)))
    runner = acc._trtkit.runner
    for i, scale in enumerate(([1.0, 0.8], [0.3, 1.1])):
        kw: dict[str, Any] = dict(prompt="a red cube", image=[pil_image(2 * i), pil_image(2 * i + 1)],
                                  num_inference_steps=6, controlnet_conditioning_scale=scale, output_type="latent")
        want = plain(**kw, generator=torch.Generator().manual_seed(3)).images.float().cpu().numpy()
        got = acc(**kw, generator=torch.Generator().manual_seed(3)).images.float().cpu().numpy()
        assert np.abs(got - want).max() / np.abs(want).max() < 2e-2
        assert runner.captures == 1
