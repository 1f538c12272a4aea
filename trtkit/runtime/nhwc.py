"""Channels-last (NHWC) activations through the torch executor's eager UNet: GroupNorm, and Transformer2D outputs.

Why our own: torch's CUDA GroupNorm reads only NCHW, so a channels-last UNet pays a copy into NCHW before
every GroupNorm and another back to NHWC at the next convolution (on the SD 1.5 UNet at 512: 156 layout
copies per step, 1.8 of its 9.9 ms of GPU time on an H200, benchmarks/profile_step.py). These kernels read
and write NHWC directly. torch.compile needs none of this (it fuses GroupNorm itself); TensorRT has its own
normalization kernels.

Three Triton kernels, all capturable in a CUDA graph (no host synchronisation, fixed grid per shape):
  1. per-channel partial statistics (count, mean, M2) over a slice of rows, Chan/Welford-combined per tile;
  2. per-(batch, group) mean and 1/std from the partials of the group's channels and all slices;
  3. y = (x - mean) * rstd * weight + bias, tiled over rows x channels (coalesced NHWC reads and writes).

diffusers' Transformer2DModel ends in `.permute(0, 3, 1, 2).contiguous()`, which turns its channels-last
tokens into NCHW, so the residual add mixes layouts (torch's slow strided path) and everything after it is
copied back (on SDXL at 1024: 1.4 ms of strided adds, 1.3 ms of copies and 13 GroupNorms left to torch per
38 ms step). Transformer2DNHWC leaves the permuted view as it is, channels-last. Same values, fewer copies.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from trtkit.runtime._swap import swap_class

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU builds of torch may lack triton; the module falls back to torch
    triton = None

ROWS_PER_SLICE = 256  # rows (pixels) whose statistics one program of kernel 1 gathers
BLOCK_ROWS = 32
BLOCK_C = 64

if triton is not None:

    @triton.jit
    def _stats(x_ptr, n_ptr, mean_ptr, m2_ptr, HW, C, S,
               ROWS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        b = tl.program_id(0)
        s = tl.program_id(1)
        cb = tl.program_id(2)
        cols = cb * BC + tl.arange(0, BC)
        cmask = cols < C
        cnt = tl.zeros([BC], dtype=tl.float32)
        mean = tl.zeros([BC], dtype=tl.float32)
        m2 = tl.zeros([BC], dtype=tl.float32)
        start = s * ROWS
        for r0 in range(0, ROWS, BR):
            rows = start + r0 + tl.arange(0, BR)
            rmask = rows < HW
            m = rmask[:, None] & cmask[None, :]
            x = tl.load(x_ptr + (b * HW + rows[:, None]) * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
            nb = tl.sum(rmask.to(tl.float32), axis=0)
            nb_safe = tl.maximum(nb, 1.0)
            mb = tl.sum(x, axis=0) / nb_safe
            d = tl.where(m, x - mb[None, :], 0.0)
            m2b = tl.sum(d * d, axis=0)
            n_new = cnt + nb
            delta = mb - mean
            frac = tl.where(n_new > 0, nb / tl.maximum(n_new, 1.0), 0.0)
            mean = mean + delta * frac
            m2 = m2 + m2b + delta * delta * cnt * frac
            cnt = n_new
        off = (b * S + s) * C + cols
        tl.store(n_ptr + off, cnt, mask=cmask)
        tl.store(mean_ptr + off, mean, mask=cmask)
        tl.store(m2_ptr + off, m2, mask=cmask)

    @triton.jit
    def _finalize(n_ptr, mean_ptr, m2_ptr, gmean_ptr, grstd_ptr, C, S, G, CG, eps,
                  BS: tl.constexpr, BG: tl.constexpr):
        pid = tl.program_id(0)  # b * G + g
        b = pid // G
        g = pid % G
        ss = tl.arange(0, BS)
        cc = tl.arange(0, BG)
        m = (ss[:, None] < S) & (cc[None, :] < CG)
        off = (b * S + ss[:, None]) * C + g * CG + cc[None, :]
        n = tl.load(n_ptr + off, mask=m, other=0.0)
        mu = tl.load(mean_ptr + off, mask=m, other=0.0)
        q = tl.load(m2_ptr + off, mask=m, other=0.0)
        total = tl.sum(tl.sum(n, axis=1), axis=0)
        gm = tl.sum(tl.sum(n * mu, axis=1), axis=0) / total
        d = tl.where(m, mu - gm, 0.0)
        gm2 = tl.sum(tl.sum(q + n * d * d, axis=1), axis=0)
        tl.store(gmean_ptr + pid, gm)
        tl.store(grstd_ptr + pid, 1.0 / tl.sqrt(gm2 / total + eps))

    @triton.jit
    def _apply(x_ptr, y_ptr, w_ptr, b_ptr, gmean_ptr, grstd_ptr, HW, C, G, CG, NRB,
               BR: tl.constexpr, BC: tl.constexpr):
        pid = tl.program_id(0)  # b * NRB + row block
        b = pid // NRB
        rows = (pid % NRB) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        rmask = rows < HW
        cmask = cols < C
        m = rmask[:, None] & cmask[None, :]
        grp = b * G + cols // CG
        mu = tl.load(gmean_ptr + grp, mask=cmask, other=0.0)
        rs = tl.load(grstd_ptr + grp, mask=cmask, other=0.0)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        bb = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        scale = rs * w
        shift = bb - mu * scale
        off = (b * HW + rows[:, None]) * C + cols[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        y = x * scale[None, :] + shift[None, :]
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)


def group_norm_nhwc(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """F.group_norm for a 4-D channels-last tensor; the result is channels-last too."""
    B, C, H, W = x.shape
    HW = H * W
    S = triton.cdiv(HW, ROWS_PER_SLICE)
    dev = x.device
    part = torch.empty((3, B, S, C), device=dev, dtype=torch.float32)
    stats = torch.empty((2, B * groups), device=dev, dtype=torch.float32)
    y = torch.empty_like(x, memory_format=torch.channels_last)
    _stats[(B, S, triton.cdiv(C, BLOCK_C))](x, part[0], part[1], part[2], HW, C, S,
                                            ROWS=ROWS_PER_SLICE, BR=BLOCK_ROWS, BC=BLOCK_C)
    cg = C // groups
    _finalize[(B * groups,)](part[0], part[1], part[2], stats[0], stats[1], C, S, groups, cg, eps,
                             BS=triton.next_power_of_2(S), BG=triton.next_power_of_2(cg))
    nrb = triton.cdiv(HW, BLOCK_ROWS)
    _apply[(B * nrb, triton.cdiv(C, BLOCK_C))](x, y, weight, bias, stats[0], stats[1], HW, C, groups, cg, nrb,
                                              BR=BLOCK_ROWS, BC=BLOCK_C)
    return y


def supported(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or _interpreting()) and _channels_last(x)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


class GroupNormNHWC(nn.GroupNorm):
    """nn.GroupNorm whose forward keeps channels-last activations channels-last; any other input takes
    torch's GroupNorm. Installed by class swap (`swap_group_norms`), so parameters and state_dict stay."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.affine and supported(x):
            return group_norm_nhwc(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def swap_group_norms(module: nn.Module) -> int:
    """Make every nn.GroupNorm in `module` a GroupNormNHWC in place; returns how many."""
    return swap_class(module, nn.GroupNorm, GroupNormNHWC)


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


@functools.cache
def _transformer_class() -> type:
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    class Transformer2DNHWC(Transformer2DModel):
        """diffusers' Transformer2DModel whose continuous-input output stays channels-last when its input was;
        any other input takes diffusers' own code. Installed by class swap (`swap_transformers`)."""

        def _get_output_for_continuous_inputs(self, hidden_states: torch.Tensor, residual: torch.Tensor,
                                              batch_size: int, height: int, width: int,
                                              inner_dim: int) -> torch.Tensor:
            if not _channels_last(residual):
                return super()._get_output_for_continuous_inputs(hidden_states, residual, batch_size, height,
                                                                  width, inner_dim)
            if self.use_linear_projection:
                hidden_states = self.proj_out(hidden_states)
            # (B, H*W, C) tokens seen as NCHW: a channels-last view, no copy
            hidden_states = hidden_states.reshape(batch_size, height, width, -1).permute(0, 3, 1, 2)
            if not self.use_linear_projection:
                hidden_states = self.proj_out(hidden_states)
            return hidden_states + residual

    return Transformer2DNHWC


def swap_transformers(module: nn.Module) -> int:
    """Make every diffusers Transformer2DModel in `module` a Transformer2DNHWC in place; returns how many."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return swap_class(module, Transformer2DModel, _transformer_class())


def available() -> bool:
    return triton is not None


__all__ = ["GroupNormNHWC", "available", "group_norm_nhwc", "swap_group_norms", "swap_transformers"]
