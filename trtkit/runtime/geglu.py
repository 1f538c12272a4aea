"""GEGLU (x * gelu(gate) over the two halves of one projection) as one kernel, for the torch executor's eager UNet.

Why our own: diffusers' GEGLU chunks the projection and runs gelu and the product as two torch kernels over
strided halves (the slow, non-vectorized elementwise path): on the SDXL UNet at 1024 they are 5.3 of a 38 ms
step on an H200 (benchmarks/profile_step.py). One Triton kernel reads both halves once and writes the result
once. torch.compile fuses this itself; TensorRT has its own fusions.

The rounding is eager torch's: gelu computed in float32 and rounded to the input dtype, then the product in
float32 rounded again, so the result equals diffusers' to the last bit wherever Triton's erf equals CUDA's.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trtkit.runtime._swap import swap_class
from trtkit.runtime.nhwc import _interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU builds of torch may lack triton; the module falls back to torch
    triton = None

BLOCK_N = 1024  # output columns per program; rows are a grid axis

if triton is not None:

    @triton.jit
    def _geglu(y_ptr, out_ptr, N, BN: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        m = cols < N
        base = y_ptr + row * 2 * N
        x = tl.load(base + cols, mask=m, other=0.0)
        g = tl.load(base + N + cols, mask=m, other=0.0).to(tl.float32)
        gelu = (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))).to(x.dtype)
        out = x.to(tl.float32) * gelu.to(tl.float32)
        tl.store(out_ptr + row * N + cols, out.to(out_ptr.dtype.element_ty), mask=m)


def geglu(y: torch.Tensor) -> torch.Tensor:
    """x * gelu(gate) for y = cat([x, gate], -1), contiguous, on a GPU (or under Triton's interpreter)."""
    n = y.shape[-1] // 2
    rows = math.prod(y.shape[:-1])
    out = torch.empty((*y.shape[:-1], n), device=y.device, dtype=y.dtype)
    if rows and n:
        _geglu[(rows, triton.cdiv(n, BLOCK_N))](y, out, n, BN=BLOCK_N)
    return out


def supported(y: torch.Tensor) -> bool:
    return (triton is not None and (y.is_cuda or _interpreting()) and y.is_contiguous() and y.shape[-1] % 2 == 0
            and y.dtype in (torch.float16, torch.bfloat16, torch.float32))


@functools.cache
def _fused_class() -> type:
    from diffusers.models.activations import GEGLU

    class FusedGEGLU(GEGLU):
        """diffusers' GEGLU whose chunk, gelu and product run as one kernel on a GPU; anything else takes
        diffusers' own forward. Installed by class swap (`swap_geglus`): parameters and state_dict stay."""

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if args or kwargs:  # diffusers' deprecated `scale`: its forward warns about it
                return super().forward(hidden_states, *args, **kwargs)
            y = self.proj(hidden_states)
            if supported(y):
                return geglu(y)
            x, gate = y.chunk(2, dim=-1)
            return x * F.gelu(gate)

    return FusedGEGLU


def swap_geglus(module: nn.Module) -> int:
    """Make every diffusers GEGLU in `module` a FusedGEGLU in place; returns how many."""
    from diffusers.models.activations import GEGLU

    return swap_class(module, GEGLU, _fused_class())


def available() -> bool:
    return triton is not None


__all__ = ["available", "geglu", "supported", "swap_geglus"]
