"""Torch fake quantization with exactly the calibration file's semantics (what the Q/DQ pass emits).

- Activations: per-tensor, scale = amax/127 (INT8: round half to even, clamp to [-128, 127], as ONNX
  QuantizeLinear) or amax/448 (FP8 E4M3: saturate to +-448, cast through torch.float8_e4m3fn).
- Weights of quantized Conv2d/Linear: per output channel, scale = max|W_row|/127 (or /448).
- SmoothQuant: the activation is divided by `s` before its quantizer, the weight's input channels
  multiplied by `s` before the weight's quantizer (exact in FP32).

Used by the digits quality benchmark and by the tests; deployment uses the Q/DQ ONNX pass instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from trtkit.calibfile import ATTENTION_INPUTS, Calibration

QMAX = {"int8": 127.0, "fp8": 448.0}


def fake_quant(x: torch.Tensor, amax: torch.Tensor | float, precision: str = "int8") -> torch.Tensor:
    """Quantize-dequantize with scale amax/QMAX (amax broadcastable against x)."""
    amax = torch.as_tensor(amax, dtype=torch.float32, device=x.device)
    scale = (amax / QMAX[precision]).clamp_min(1e-12)
    xf = x.float() / scale
    if precision == "int8":
        q = torch.round(xf).clamp(-128, 127)
    else:
        q = xf.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()
    return (q * scale).to(x.dtype)


def fake_quant_weight(w: torch.Tensor, precision: str = "int8") -> torch.Tensor:
    """Per-output-channel (axis 0) weight quantization."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(1).float()
    return fake_quant(w, amax.view(-1, *([1] * (w.dim() - 1))), precision)


def targets_of(cal: Calibration, model: torch.nn.Module) -> dict[str, str]:
    """{module name: kind} for what a calibration file quantizes in `model`."""
    modules = dict(model.named_modules())
    cal.check_modules(modules)
    out: dict[str, str] = {}
    for key in cal.activations:
        base, _, last = key.rpartition(".")
        if last in ATTENTION_INPUTS and base in modules and not isinstance(modules.get(key), torch.nn.Module):
            out[base] = "attention"
        else:
            out[key] = "conv" if isinstance(modules[key], torch.nn.Conv2d) else "linear"
    return out


@contextlib.contextmanager
def quantized(model: torch.nn.Module, cal: Calibration, weights: bool = True,
              activations: bool = True) -> Iterator[None]:
    """Run `model` fake-quantized per `cal` inside the block (weights restored afterwards).

    SmoothQuant is always applied; `weights`/`activations` False leave that side unquantized (with
    both False only the smoothing transform remains, which must not change the output)."""
    from trtkit.calibration.hooks import tapped
    from trtkit.calibration.hooks_dit import tapped_dit

    # a DiT's attention runs one fused kernel: its taps wrap the processor (hooks_dit.py)
    tap_context = tapped_dit if hasattr(model, "transformer_blocks") and not hasattr(model, "down_blocks") else tapped
    modules = dict(model.named_modules())
    targets = targets_of(cal, model)
    prec = cal.precision
    smooth = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in cal.smooth.items()}
    saved: dict[str, torch.Tensor] = {}

    def tap(key: str, x: torch.Tensor) -> torch.Tensor:
        s = smooth.get(key)
        if s is not None:
            x = x / s.to(x.device, x.dtype)
        # the softmax output is quantized with amax 1 whatever the file says: the Q/DQ pass fixes it there
        amax = 1.0 if key.endswith(".softmax") else cal.activations[key]
        return fake_quant(x, amax, prec) if activations else x

    try:
        with torch.no_grad():
            for name, kind in targets.items():
                s = smooth.get(name)
                if kind == "attention" or (not weights and s is None):
                    continue
                w = modules[name].weight
                saved[name] = w.detach().clone()
                ws = w * s.to(w.device, w.dtype) if s is not None else w
                w.copy_(fake_quant_weight(ws, prec) if weights else ws)
        with tap_context(model, targets, tap):
            yield
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                modules[name].weight.copy_(w)
