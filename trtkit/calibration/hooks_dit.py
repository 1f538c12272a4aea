"""Calibration taps on a DiT transformer (FLUX.1, SD3.x): the inputs the Q/DQ pass quantizes, keyed by
diffusers module name as for the UNet (trtkit/calibration/hooks.py).

Which inputs: the DiT rule of the graph pass (trtkit/graph/patterns_dit.py: levels, exclusions), so the
calibration file names exactly the modules the pass looks up. Linear inputs are tapped with the UNet's
forward pre-hooks. Attention cannot be: FLUX and SD3 call one fused kernel (diffusers'
`dispatch_attention_fn`, or SDPA) on q/k/v that exist only inside their processors. While a tapped
attention module runs, that kernel is replaced by the same math with explicit BMMs and taps on
`<attn>.q_bmm`, `.k_bmm`, `.v_bmm` (after the head split, q/k norms and RoPE, before the 1/sqrt(d)
scale, as hooks.py records them) and `.softmax` (the probabilities).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from trtkit.calibration.hooks import Tap, tapped


def targets(model: torch.nn.Module, level: float, precision: str = "fp8") -> dict[str, str]:
    """{module name: kind} of every quantized input of a DiT transformer at `level`."""
    from trtkit.graph import patterns_dit

    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
            kind = "linear" if isinstance(m, torch.nn.Linear) else "conv"
            if patterns_dit.exclusion(name) is None and patterns_dit.admits(name, kind, level)[0]:
                out[name] = kind
        elif hasattr(m, "processor") and hasattr(m, "to_q"):  # an attention module
            head = getattr(m, "head_dim", None) or (m.inner_dim // m.heads if getattr(m, "heads", 0) else None)
            if precision == "fp8" and level >= 4 and head is not None and head % 16 == 0:
                out[name] = "attention"
    return out


def _explicit(name: str, tap: Tap, q: Any, k: Any, v: Any) -> Any:
    """softmax(q kᵀ / sqrt(d)) v on [B, H, S, D] with taps on the four BMM inputs."""
    q, k, v = tap(f"{name}.q_bmm", q), tap(f"{name}.k_bmm", k), tap(f"{name}.v_bmm", v)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    probs = tap(f"{name}.softmax", scores.float().softmax(-1).to(q.dtype))
    return torch.matmul(probs, v)


class TapKernelProcessor:
    """Wraps a module's processor; while it runs, the attention kernel it calls is the tapped explicit one."""

    def __init__(self, name: str, inner: Any, tap: Tap) -> None:
        self.name, self.inner, self.tap = name, inner, tap

    def __getattr__(self, item: str) -> Any:  # diffusers reads attributes of the processor it holds
        return getattr(self.inner, item)

    def __call__(self, attn: Any, *args: Any, **kwargs: Any) -> Any:
        import diffusers.models.transformers.transformer_flux as tf
        import torch.nn.functional as F

        name, tap = self.name, self.tap

        def dispatch(query: Any, key: Any, value: Any, attn_mask: Any = None, **_: Any) -> Any:  # [B, S, H, D]
            assert attn_mask is None, "masked attention is not calibrated"
            out = _explicit(name, tap, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
            return out.transpose(1, 2)

        def sdpa(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                 is_causal: bool = False, **_: Any) -> Any:  # [B, H, S, D]
            assert attn_mask is None and not is_causal, "masked attention is not calibrated"
            return _explicit(name, tap, query, key, value)

        saved = tf.dispatch_attention_fn, F.scaled_dot_product_attention
        tf.dispatch_attention_fn, F.scaled_dot_product_attention = dispatch, sdpa  # type: ignore[assignment]
        try:
            return self.inner(attn, *args, **kwargs)
        finally:
            tf.dispatch_attention_fn, F.scaled_dot_product_attention = saved


@contextlib.contextmanager
def tapped_dit(model: torch.nn.Module, targets: dict[str, str], tap: Tap) -> Iterator[None]:
    """Route every target input of a DiT transformer through `tap` (linear/conv: pre-hooks; attention:
    TapKernelProcessor)."""
    modules = dict(model.named_modules())
    saved: dict[str, Any] = {}
    try:
        for name, kind in targets.items():
            if kind == "attention":
                saved[name] = modules[name].processor
                modules[name].processor = TapKernelProcessor(name, saved[name], tap)
        with tapped(model, {k: v for k, v in targets.items() if v != "attention"}, tap):
            yield
    finally:
        for name, proc in saved.items():
            modules[name].processor = proc
