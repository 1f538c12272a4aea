"""A LoRA adapter with seeded random weights for a diffusers UNet, written as safetensors in diffusers/PEFT key
style (diffusers' own `save_lora_weights`) and in kohya key style, for tests and benchmarks (no download).

The kohya writer is ours (diffusers reads kohya files but writes none): module path dots become underscores
under `lora_unet_`, lora_A/lora_B become lora_down/lora_up, and every layer gets its `.alpha`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def random_lora_state(unet: Any, seed: int = 0, rank: int = 4, targets: tuple[str, ...] = ATTENTION,
                      std: float = 1.0) -> dict[str, Any]:
    """{"<module>.lora_A.weight": (r, in), "<module>.lora_B.weight": (out, r)} for every Linear (or 1x1 Conv)
    of `unet` whose name ends with one of `targets`; float32, drawn from `seed`. B@A is scaled so the delta
    is `std` times the base weight's typical size (a LoRA that visibly changes the output)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for name, m in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        w = getattr(m, "weight", None)
        if w is None or w.dim() not in (2, 4):
            continue
        o, i = w.shape[0], w.shape[1]
        ks = tuple(w.shape[2:])
        fan_in = i * (ks[0] * ks[1] if ks else 1)
        a = torch.randn((rank, i, *ks), generator=g) / fan_in ** 0.5
        b = torch.randn((o, rank, *([1] * len(ks))), generator=g) * float(w.detach().float().std()) * std / rank ** 0.5
        out[f"{name}.lora_A.weight"] = a.contiguous()
        out[f"{name}.lora_B.weight"] = b.contiguous()
    if not out:
        raise ValueError(f"no module of the UNet ends with one of {targets}")
    return out


def save_diffusers(state: dict[str, Any], folder: Path | str, name: str = "lora.safetensors",
                   pipeline_cls: Any = None, alpha: float | None = None,
                   targets: tuple[str, ...] = ATTENTION) -> Path:
    """diffusers' own writer (keys `unet.<module>.lora_A.weight`); alpha (default: rank) goes in the file's
    metadata the way diffusers reads it back."""
    if pipeline_cls is None:
        from diffusers import StableDiffusionPipeline as pipeline_cls
    rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
    meta = {"r": rank, "lora_alpha": alpha if alpha is not None else rank, "target_modules": list(targets)}
    pipeline_cls.save_lora_weights(str(folder), unet_lora_layers=state, weight_name=name,
                                   unet_lora_adapter_metadata=meta)
    return Path(folder) / name


def kohya_state(state: dict[str, Any], alpha: float) -> dict[str, Any]:
    """The same adapter in kohya key style, `lora_unet_<module_with_underscores>.lora_down/up.weight` + `.alpha`."""
    import torch

    out: dict[str, Any] = {}
    for k, v in state.items():
        module, part = k.rsplit(".lora_", 1)
        base = "lora_unet_" + module.replace(".", "_")
        out[f"{base}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = v
        out[f"{base}.alpha"] = torch.tensor(float(alpha))
    return out


def save_kohya(state: dict[str, Any], path: Path | str, alpha: float) -> Path:
    from safetensors.torch import save_file

    save_file(kohya_state(state, alpha), str(path))
    return Path(path)
