"""Which inputs are quantized: NVIDIA demoDiffusion's quantization levels and default exclusions.

ONE rule, shared in spirit with the graph pass (trtkit/graph/ applies the same rule from the ONNX side,
on module names recovered from node scopes). Names are diffusers module names relative to the UNet,
e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`.

| level | Conv2d inputs | Linear inputs                              | attention BMM inputs            |
|-------|---------------|--------------------------------------------|---------------------------------|
| 1     | yes           | none                                       | no                              |
| 2     | yes           | name contains `ff.net` (feed-forward)      | no                              |
| 2.5   | yes           | + name ends with `to_q`/`to_k`/`to_v`      | no                              |
| 3     | yes           | every Linear                               | no                              |
| 4     | yes           | every Linear                               | q_bmm, k_bmm, v_bmm, softmax     |

Always excluded (demoDiffusion `filter_func`), matched as substrings of the name:
time_emb_proj, time_embedding, conv_in, conv_out, conv_shortcut, add_embedding, pos_embed,
time_text_embed, context_embedder, norm_out, proj_out. Level 4 attention inputs are only taken where
the head size is a multiple of 16 (TensorRT's fused FP8 attention needs it).
"""

from __future__ import annotations

LEVELS = (1.0, 2.0, 2.5, 3.0, 4.0)
EXCLUDED = ("time_emb_proj", "time_embedding", "conv_in", "conv_out", "conv_shortcut", "add_embedding",
            "pos_embed", "time_text_embed", "context_embedder", "norm_out", "proj_out")
QKV = ("to_q", "to_k", "to_v")


def quantized(name: str, kind: str, level: float, head_size: int | None = None) -> bool:
    """Is the input of module `name` (kind "conv", "linear" or "attention") quantized at `level`?"""
    if any(pat in name for pat in EXCLUDED):
        return False
    if kind == "conv":
        return level >= 1
    if kind == "linear":
        if level >= 3:
            return True
        if level >= 2.5 and name.rsplit(".", 1)[-1] in QKV:
            return True
        return level >= 2 and "ff.net" in name
    if kind == "attention":
        return level >= 4 and head_size is not None and head_size % 16 == 0
    raise ValueError(f"unknown module kind {kind!r}")


def check_level(level: float) -> float:
    from trtkit.errors import TrtkitError

    if float(level) not in LEVELS:
        raise TrtkitError(f"quantization level {level:g} is not one of {', '.join(f'{x:g}' for x in LEVELS)}")
    return float(level)


def targets(model, level: float) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """{module name: kind} of every quantized input of a torch model (diffusers UNet) at `level`."""
    import torch
    from diffusers.models.attention_processor import Attention

    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            kind = "conv"
        elif isinstance(m, torch.nn.Linear):
            kind = "linear"
        elif isinstance(m, Attention):
            kind = "attention"
            head = m.inner_dim // m.heads if getattr(m, "heads", 0) else None
            if quantized(name, kind, level, head):
                out[name] = kind
            continue
        else:
            continue
        if quantized(name, kind, level):
            out[name] = kind
    return out
