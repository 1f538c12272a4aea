"""FLOPs of one UNet step (batch 2: guidance on), by kind: linear layers, convolutions, attention.

Counted on the meta device (no weights, no GPU) with forward hooks on nn.Linear / nn.Conv2d and a wrapper
around F.scaled_dot_product_attention; set against profile_step.py's kernel times it gives each kind's
achieved throughput.

Usage:  python benchmarks/count_flops.py --arch sdxl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from _configs import SD15_UNET, SDXL_UNET  # benchmarks/ is on sys.path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def count(cfg: dict[str, Any], res: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    flops = {"linear": 0.0, "conv": 0.0, "attention": 0.0}

    def linear(m: Any, inputs: Any, out: Any) -> None:
        flops["linear"] += 2 * inputs[0].numel() // m.in_features * m.in_features * m.out_features

    def conv(m: Any, inputs: Any, out: Any) -> None:
        flops["conv"] += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    sdpa = F.scaled_dot_product_attention

    def attention(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
        flops["attention"] += 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]  # QK^T and PV
        return sdpa(q, k, v, *args, **kwargs)

    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg).half()
    for m in unet.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(linear)
        elif isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(conv)
    F.scaled_dot_product_attention = attention
    try:
        with torch.device("meta"), torch.no_grad():
            lat = res // 8
            kw: dict[str, Any] = {}
            if cfg.get("addition_embed_type") == "text_time":
                pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
                kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, dtype=torch.half),
                                           "time_ids": torch.randn(2, 6, dtype=torch.half)}
            unet(torch.randn(2, cfg["in_channels"], lat, lat, dtype=torch.half), torch.tensor(10.0),
                 encoder_hidden_states=torch.randn(2, 77, cfg["cross_attention_dim"], dtype=torch.half), **kw)
    finally:
        F.scaled_dot_product_attention = sdpa
    return flops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["sdxl", "sd15"], default="sdxl")
    args = ap.parse_args()
    cfg, res = (SDXL_UNET, 1024) if args.arch == "sdxl" else (SD15_UNET, 512)
    flops = count(cfg, res)
    print(f"{args.arch} {res}x{res}, UNet batch 2: " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP" for k, v in flops.items())
          + f", total {sum(flops.values()) / 1e12:.2f} TFLOP")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
