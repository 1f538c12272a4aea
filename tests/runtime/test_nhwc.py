"""The channels-last GroupNorm against torch's F.group_norm: on the CPU through Triton's interpreter (the
kernels' own code, run by numpy), on a GPU compiled, eagerly and inside a CUDA graph."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trtkit.errors import TrtkitError

# (batch, channels, height, width, groups): SD UNet-like widths, odd spatial sizes, one slice and several
SHAPES = [(2, 320, 16, 16, 32), (1, 960, 7, 9, 32), (2, 64, 33, 17, 8), (1, 40, 3, 3, 4)]


def test_kernels_match_torch_in_triton_interpreter() -> None:
    pytest.importorskip("triton")
    code = textwrap.dedent(f"""
        import torch, torch.nn.functional as F
        from trtkit.runtime.nhwc import group_norm_nhwc
        torch.manual_seed(0)
        for B, C, H, W, G in {SHAPES!r}:
            for dt in (torch.float32, torch.float16):
                # an offset mean: a sum-of-squares variance would lose digits here, Welford does not
                x = (torch.randn(B, C, H, W) * 3 + 20).to(dt).to(memory_format=torch.channels_last)
                w, b = torch.randn(C).to(dt), torch.randn(C).to(dt)
                y = group_norm_nhwc(x, G, w, b, 1e-5)
                ref = F.group_norm(x.float().contiguous(), G, w.float(), b.float(), 1e-5)
                assert y.dtype == dt and y.is_contiguous(memory_format=torch.channels_last)
                err = (y.float() - ref).abs().max().item()
                tol = 1e-4 if dt == torch.float32 else 2e-2
                assert err < tol, (B, C, H, W, G, dt, err)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_swapped_module_falls_back_to_torch_off_gpu() -> None:
    """The class swap keeps parameters and state_dict; an input the kernels don't take goes to torch."""
    from trtkit.runtime.nhwc import GroupNormNHWC, swap_group_norms

    net = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3), torch.nn.GroupNorm(8, 32))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 4, 9, 9)
    want = net(x)
    assert swap_group_norms(net) == 1 and isinstance(net[1], GroupNormNHWC)
    assert net.state_dict().keys() == before.keys()
    torch.testing.assert_close(net(x), want)


def test_transformers_hand_back_channels_last(tiny_model_dir: Path) -> None:
    """Transformer2DNHWC: the same values as diffusers' Transformer2DModel, channels-last out for channels-last in
    (diffusers' own is NCHW), NCHW in and out as before."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from trtkit.runtime.nhwc import swap_transformers

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval()
    block = next(m for m in unet.modules() if isinstance(m, Transformer2DModel))
    g = torch.Generator().manual_seed(0)
    c = block.config.in_channels
    x = torch.randn(2, c, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        want = block(x, encoder_hidden_states=ctx, return_dict=False)[0]
        assert swap_transformers(unet) > 0 and isinstance(block, Transformer2DModel)
        got = block(x.to(memory_format=torch.channels_last), encoder_hidden_states=ctx, return_dict=False)[0]
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        nchw = block(x, encoder_hidden_states=ctx, return_dict=False)[0]
        assert nchw.is_contiguous()
        torch.testing.assert_close(nchw, want, rtol=0, atol=0)


@pytest.mark.parametrize("opts,match", [
    ({"nhwc_group_norm": True}, "needs channels_last"),
    ({"nhwc_transformer": True}, "nhwc_transformer needs channels_last"),
    ({"nhwc_group_norm": True, "channels_last": True, "compile": True}, "torch.compile fuses GroupNorm"),
])
def test_executor_option_errors(opts: dict, match: str) -> None:
    from trtkit.runtime.executors import TorchExecutor

    with pytest.raises(TrtkitError, match=match):
        TorchExecutor(torch.nn.Linear(2, 2), **opts)


@pytest.mark.gpu
@pytest.mark.parametrize("B,C,H,W,G", SHAPES + [(2, 1280, 64, 64, 32)])
def test_kernels_match_torch_on_gpu(B: int, C: int, H: int, W: int, G: int) -> None:
    from trtkit.runtime.nhwc import group_norm_nhwc

    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(B, C, H, W, device="cuda", generator=g) * 3 + 20).half().to(memory_format=torch.channels_last)
    w = torch.randn(C, device="cuda", generator=g).half()
    b = torch.randn(C, device="cuda", generator=g).half()
    ref = F.group_norm(x.float().contiguous(), G, w.float(), b.float(), 1e-5)
    y = group_norm_nhwc(x, G, w, b, 1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert (y.float() - ref).abs().max().item() < 2e-2
    # captured: the same result from a replay over new input values
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = group_norm_nhwc(x, G, w, b, 1e-5)
    x.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    ref2 = F.group_norm(x.float().contiguous(), G, w.float(), b.float(), 1e-5)
    assert (yg.float() - ref2).abs().max().item() < 2e-2
