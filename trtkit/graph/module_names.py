"""Diffusers module names for exported graph nodes and initializers, and the UNet block a module sits in.

Plain string work (no graphsurgeon), shared by the pattern finders (patterns.py) and ControlNet's block kinds.
"""

from __future__ import annotations

# Top-level module names of diffusers UNets/VAEs/text encoders: where a module path starts when the
# scope prefix is unknown.
KNOWN_ROOTS = ("conv_in", "time_proj", "time_embedding", "add_time_proj", "add_embedding", "down_blocks",
               "mid_block", "up_blocks", "conv_norm_out", "conv_act", "conv_out", "encoder_hid_proj",
               "class_embedding", "decoder", "encoder", "post_quant_conv", "quant_conv", "text_model",
               "transformer_blocks", "pos_embed", "context_embedder", "time_text_embed", "norm_out", "proj_out")


def _strip_to_root(parts: list[str]) -> list[str]:
    for i, p in enumerate(parts):
        if p in KNOWN_ROOTS:
            return parts[i:]
    return parts


def module_from_node(node_name: str, scope: str | None) -> str | None:
    """`/unet/down_blocks.1/.../to_q/MatMul` -> `down_blocks.1....to_q`; None without a scope path."""
    if "/" not in node_name.strip("/"):
        return None
    name = node_name
    if scope and name.startswith(scope):
        name = name[len(scope):]
    parts = [p for p in name.split("/") if p]
    parts = parts[:-1]  # the last part is the op's own name (MatMul, Conv_1, ...)
    if not parts:
        return None
    if not scope:
        parts = _strip_to_root(parts)
    return ".".join(parts)


def module_from_initializer(name: str) -> str | None:
    """`unet.down_blocks.0.resnets.0.conv1.weight` -> `down_blocks.0.resnets.0.conv1`."""
    if name.startswith("onnx::") or "." not in name:
        return None
    parts = name.split(".")
    if parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return ".".join(_strip_to_root(parts))


def block_of(module: str) -> str:
    """The UNet block a module belongs to: down_blocks.N, mid_block, up_blocks.N or other."""
    parts = module.split(".")
    for i, p in enumerate(parts):  # VAE modules sit one level down (decoder.up_blocks.0...)
        if p in ("down_blocks", "up_blocks") and i + 1 < len(parts) and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2]) if i else f"{p}.{parts[i + 1]}"
        if p == "mid_block":
            return ".".join(parts[: i + 1])
    return "other"
