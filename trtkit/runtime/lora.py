"""LoRA adapters (diffusers' `load_lora_weights`, i.e. PEFT layers) on the torch executor's UNet.

What a captured loop graph bakes in besides weight addresses: PEFT's Python-side state. An unmerged LoRA
layer computes `base(x) + lora_B(lora_A(x)) * scaling` for its active adapters, with `scaling` a Python
float that the graph holds as a kernel argument, and which adapters run decides which kernels are in the
graph. A merged layer (`pipe.fuse_lora()`) runs `base(x)` only, with the delta added to the base weight in
place (same address), so which adapter is merged does not matter to the graph. `graph_state` lists exactly
that, so the runner re-captures on `set_adapters` / scale changes of unmerged adapters and not when fused
adapters are swapped in place (unfuse_lora, set_adapters, fuse_lora).

diffusers' fused q/k/v (runtime executors' fuse_qkv) reads `to_qkv` / `to_kv`, a copy of the base weights
without any LoRA: an attention whose to_q/to_k/to_v is a PEFT layer must run unfused (`unfuse_wrapped`).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def is_tuner_layer(module: Any) -> bool:
    """A PEFT adapter layer (duck-typed: peft is only needed where such layers exist)."""
    return hasattr(module, "base_layer") and hasattr(module, "merged_adapters") and hasattr(module, "scaling")


def layer_state(module: Any) -> tuple:
    """What of one PEFT layer's state its forward pass depends on, besides tensor values."""
    if getattr(module, "disable_adapters", False):
        return ("disabled",)
    if getattr(module, "merged", False):  # base(x) only; the merged delta lives in the weight (in place)
        return ("merged",)
    active = [a for a in module.active_adapters if a in getattr(module, "lora_A", {})]
    return ("unmerged", tuple((a, float(module.scaling[a])) for a in active))


def graph_state(unet: Any) -> tuple:
    """Everything a captured graph of `unet` bakes in: each parameter's address, each PEFT layer's state (by
    module name) and each attention's processor class (fused or not)."""
    ptrs = tuple(p.data_ptr() for p in unet.parameters())
    layers = []
    procs = []
    for name, m in unet.named_modules():
        if is_tuner_layer(m):
            layers.append((name, layer_state(m)))
        elif hasattr(m, "processor") and hasattr(m, "to_q"):
            procs.append(type(m.processor).__name__)
    return ptrs, tuple(layers), tuple(procs)


def wrapped_fused_attentions(unet: Any) -> list[tuple[str, Any]]:
    """Attention modules running fused q/k/v while a projection they fuse is a PEFT layer (wrong results)."""
    out = []
    for name, m in unet.named_modules():
        if not getattr(m, "fused_projections", False):
            continue
        fused = ("to_q", "to_k", "to_v") if getattr(m, "to_qkv", None) is not None else ("to_k", "to_v")
        if any(is_tuner_layer(getattr(m, p, None)) for p in fused):
            out.append((name, m))
    return out


def unfuse_wrapped(unet: Any) -> list[str]:
    """Give every attention of `wrapped_fused_attentions` diffusers' unfused processor back (the LoRA then
    applies through to_q/to_k/to_v); returns their names. The others keep the fused GEMMs."""
    found = wrapped_fused_attentions(unet)
    if not found:
        return []
    from diffusers.models.attention_processor import AttnProcessor2_0

    for _, m in found:
        m.set_processor(AttnProcessor2_0())
        m.fused_projections = False
        for attr in ("to_qkv", "to_kv"):  # to_q/k/v's weights are views of these (fuse_qkv_shared): no copy lost
            if getattr(m, attr, None) is not None:
                delattr(m, attr)
    names = [n for n, _ in found]
    log.info("trtkit: %d attention(s) with LoRA on q/k/v run unfused (fused q/k/v holds no LoRA): %s",
             len(names), ", ".join(names[:3]) + (" ..." if len(names) > 3 else ""))
    return names


def load_fused(pipe: Any, path: Any, scale: float = 1.0) -> int:
    """`trtkit run --lora FILE [--lora-scale s]` on the torch UNet: diffusers loads the adapter (diffusers/PEFT or
    kohya keys, text-encoder layers included), fuses it at `scale` and drops the PEFT layers, so the run has the
    base model's modules (fused q/k/v and the loop graph as without a LoRA). Returns how many UNet layers it
    changed; a file diffusers cannot read, or whose keys match no UNet layer, is a one-line TrtkitError."""
    from pathlib import Path

    from trtkit.errors import TrtkitError

    path = Path(path)
    if not path.is_file():
        raise TrtkitError(f"LoRA file {path} does not exist")
    try:
        pipe.load_lora_weights(str(path), adapter_name="trtkit_lora")
    except Exception as e:  # diffusers/peft raise ValueError, KeyError, RuntimeError, SafetensorError ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrtkitError(f"{path}: diffusers could not load it as a LoRA: {first[:200]}") from None
    n = sum(1 for m in pipe.unet.modules() if is_tuner_layer(m))
    if n == 0:  # diffusers only warns when no key matches the UNet
        pipe.unload_lora_weights()
        raise TrtkitError(f"{path}: no key of it matches a layer of this UNet (a LoRA for another model?)")
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # keeps the fused weights
    log.info("trtkit: LoRA %s fused at scale %s into %d UNet layers", path.name, scale, n)
    return n
