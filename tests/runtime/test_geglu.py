"""The one-kernel GEGLU against diffusers' chunk + gelu + product: on the CPU through Triton's interpreter (the
kernel's own code, run by numpy), on a GPU compiled, eagerly and inside a CUDA graph."""

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

# (rows..., 2 * width): SD/SDXL feed-forward widths and odd ones
SHAPES = [(2, 7, 2 * 32), (3, 5, 2 * 1000), (1, 4, 2 * 1280), (2, 1, 2 * 1)]


def test_kernel_matches_float32_math_in_triton_interpreter() -> None:
    pytest.importorskip("triton")
    code = textwrap.dedent(f"""
        import torch, torch.nn.functional as F
        from trtkit.runtime.geglu import geglu
        torch.manual_seed(0)
        for shape in {SHAPES!r}:
            for dt in (torch.float32, torch.float16, torch.bfloat16):
                y = (torch.randn(shape) * 3).to(dt)
                x, g = y.float().chunk(2, -1)
                out = geglu(y)
                assert out.dtype == dt and out.shape == (*shape[:-1], shape[-1] // 2)
                # gelu rounded to dt, then the product rounded: within 2 roundings of the float32 math (and
                # erf's own last bits where 1 + erf cancels: an absolute floor at the output's scale)
                ref, eps = x * F.gelu(g), torch.finfo(dt).eps
                torch.testing.assert_close(out.float(), ref, rtol=2 * eps, atol=2 * eps * ref.abs().max().item())
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_swapped_geglus_keep_the_unet(tiny_model_dir: Path) -> None:
    """The class swap keeps parameters, state_dict and isinstance; off the GPU it runs diffusers' math."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.activations import GEGLU

    from trtkit.runtime.geglu import swap_geglus

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval()
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor(500.0))
    kw = {"encoder_hidden_states": torch.randn(2, 77, 64, generator=g),
          "added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6)}}
    keys = unet.state_dict().keys()
    with torch.no_grad():
        want = unet(*args, **kw)[0]
        n = swap_geglus(unet)
        assert n > 0 and sum(isinstance(m, GEGLU) and type(m) is not GEGLU for m in unet.modules()) == n
        assert unet.state_dict().keys() == keys
        torch.testing.assert_close(unet(*args, **kw)[0], want, rtol=0, atol=0)


def test_executor_refuses_fused_geglu_under_compile() -> None:
    from trtkit.runtime.executors import TorchExecutor

    with pytest.raises(TrtkitError, match="torch.compile fuses GEGLU itself"):
        TorchExecutor(torch.nn.Linear(2, 2), compile=True, fused_geglu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES + [(2, 4096, 2 * 2560)])
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_kernel_matches_eager_torch_on_gpu(shape: tuple[int, ...], dt: torch.dtype) -> None:
    from trtkit.runtime.geglu import geglu

    g = torch.Generator(device="cuda").manual_seed(0)
    y = (torch.randn(shape, device="cuda", generator=g) * 3).to(dt)
    x, gate = y.chunk(2, -1)
    # eager torch rounds the same way; only an erf that differs in its last bits may change a result
    ref, eps = x * F.gelu(gate), torch.finfo(dt).eps
    torch.testing.assert_close(geglu(y), ref, rtol=eps, atol=eps * ref.abs().max().item())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = geglu(y)
    y.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    ref = x * F.gelu(gate)
    torch.testing.assert_close(out, ref, rtol=eps, atol=eps * ref.abs().max().item())
