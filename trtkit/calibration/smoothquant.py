"""SmoothQuant for INT8 linear layers, with the alpha searched per layer.

For a Linear y = x W^T with per-input-channel activation range a_j = max|X_j| (over all recorded
calls) and weight range w_j = max_i |W_ij|, the smoothing vector is
    s_j = a_j^alpha / w_j^(1 - alpha)
and the layer becomes (x / s) (W * s)^T, exact in FP32; the outliers of x move into W, whose
per-output-channel INT8 scales absorb them better than one per-tensor activation scale.

alpha search: for each alpha on the grid (0.5, 0.55, ..., 0.95), quantize W*s per output channel
and the recorded activation sample x/s per tensor (with the amax the calibration would actually
choose for that s), and measure the mean squared error of the layer output against FP32. The alpha
with the smallest error wins; if no alpha beats the unsmoothed layer, the layer is left unsmoothed
(search mode only; a fixed --alpha is always applied).

Written here rather than taken from ModelOpt (not installed here; its smoothquant uses one alpha for
all layers and a max-calibrated amax, and cannot re-score a layer with a per-step-reduced range).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from trtkit.calibration.fakequant import fake_quant, fake_quant_weight

ALPHAS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def weight_in_amax(weight: torch.Tensor) -> np.ndarray:
    """max |W| per input channel (over output channels) of a Linear weight [out, in]."""
    return weight.detach().abs().amax(0).float().cpu().numpy().astype(np.float64)


def smooth_vector(act_amax: np.ndarray, w_amax: np.ndarray, alpha: float) -> np.ndarray:
    a = np.maximum(np.asarray(act_amax, dtype=np.float64), 1e-5)
    w = np.maximum(np.asarray(w_amax, dtype=np.float64), 1e-5)
    return np.clip(a**alpha / w ** (1.0 - alpha), 1e-4, 1e4)


def quantized_error(x: torch.Tensor, weight: torch.Tensor, s: np.ndarray | None, act_amax: float) -> float:
    """Mean squared error of the INT8 layer output (bias left out: it is not quantized) vs FP32."""
    x, weight = x.float(), weight.detach().float()
    ref = x @ weight.T
    if s is not None:
        st = torch.as_tensor(s, dtype=torch.float32)
        xq, wq = fake_quant(x / st, act_amax), fake_quant_weight(weight * st)
    else:
        xq, wq = fake_quant(x, act_amax), fake_quant_weight(weight)
    return float(((xq @ wq.T) - ref).pow(2).mean())


@dataclass(frozen=True)
class SmoothResult:
    alpha: float | None  # None: left unsmoothed
    smooth: np.ndarray | None
    error: float
    error_unsmoothed: float


def search(x: np.ndarray | torch.Tensor, weight: torch.Tensor, chan_amax: np.ndarray,
           amax_for: Callable[[np.ndarray | None], float], alphas: tuple[float, ...] = ALPHAS,
           fixed: float | None = None) -> SmoothResult:
    """Choose alpha for one layer; `amax_for(s)` gives the calibrated activation amax after dividing by s."""
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    # the recorded rows are CPU numpy; a UNet calibrated on a GPU has its weights there (and in FP16)
    weight = weight.detach().float().cpu()
    w_amax = weight_in_amax(weight)
    base = quantized_error(xt, weight, None, amax_for(None))
    best: SmoothResult | None = None
    for alpha in ((fixed,) if fixed is not None else alphas):
        s = smooth_vector(chan_amax, w_amax, alpha)
        err = quantized_error(xt, weight, s, amax_for(s))
        if best is None or err < best.error:
            best = SmoothResult(alpha, s, err, base)
    assert best is not None
    if fixed is None and best.error >= base:
        return SmoothResult(None, None, base, base)
    return best
