"""Q/DQ rules for a ControlNet graph, beside the UNet's (trtkit/graph/choice.py).

A ControlNet is the UNet's encoder (conv_in, time/added embeddings, down_blocks, mid_block: the same
modules, matched by the same finders of patterns.py) plus
* `controlnet_cond_embedding`: a small conv stack on the conditioning image (conv_in reads the 3-channel
  image, `blocks.N`, conv_out, which starts zero-initialised);
* the zero convs `controlnet_down_blocks.N` and `controlnet_mid_block`: 1x1 convs whose outputs are the
  residuals added into the UNet's skip connections.
The levels are the UNet's (convs at every level, linears by level, attention at FP8 level 4); the defaults
exclude the UNet's list (which already keeps `controlnet_cond_embedding.conv_in/conv_out` through its
`conv_in`/`conv_out` entries) and CONTROLNET_EXCLUDE below, chosen from measurements in its comments.
A graph is a ControlNet when its export metadata says `trtkit.component` = controlnet.
"""

from __future__ import annotations

from trtkit.graph.choice import UNET_RULES, Rules
from trtkit.graph.module_names import block_of

# (module prefix, why). Measured on the tiny ControlNets (trtkit/tiny_controlnet.py; tiny-256 opt shapes, inputs
# of another seed than the pass's max-calibration run; FP32 outside the Q/DQ): relative error of the UNet's
# noise_pred when it takes the quantized ControlNet's residuals instead of the FP32 ones (max |diff| / max |ref|).
#                          SDXL INT8   SDXL FP8   SD15 INT8   SD15 FP8
#   both excluded (default)  0.0154     0.0333     0.0140      0.0266
#   zero convs quantized     0.0142     0.0440     0.0158      0.0361
#   cond embedding quantized 0.0148     0.0329     0.0149      0.0286
#   both quantized           0.0153     0.0420     0.0201      0.0457
# The zero convs cost up to +36 % (FP8) and gain nothing measurable; the conditioning embedding is neutral to
# +22 % (SD15 FP8, its 3x3 blocks alone) and is a few narrow convs (16 to 256 channels) where 8-bit buys
# little. Random weights are not trained ones: trained zero convs have small outputs that a per-tensor
# activation scale on a shared skip connection resolves worse still. --include overrides either.
CONTROLNET_EXCLUDE: tuple[tuple[str, str], ...] = (
    ("controlnet_cond_embedding", "conditioning embedding: reads the conditioning image (3 channels, like the "
                                  "UNet's conv_in) and is a few small convs"),
    ("controlnet_down_blocks", "zero conv: its output is added unscaled into a UNet skip connection"),
    ("controlnet_mid_block", "zero conv: its output is added unscaled into the UNet's mid block"),
)
BLOCK_KINDS = {"controlnet_cond_embedding": "conditioning embedding", "controlnet_down_blocks": "zero convs",
               "controlnet_mid_block": "zero convs"}


def is_controlnet(meta: dict[str, str]) -> bool:
    return meta.get("trtkit.component") == "controlnet"


def exclusion(module: str) -> str | None:
    """Why a ControlNet module stays in high precision by default, or None."""
    for root, why in CONTROLNET_EXCLUDE:
        if module == root or module.startswith(root + "."):
            return f"default exclusion ({root}): {why}"
    return UNET_RULES.exclusion(module)


RULES = Rules(exclusion, UNET_RULES.admits)


def block_kind(module: str) -> str:
    """Coverage groups: the UNet's blocks (down_blocks.N, mid_block), the conditioning embedding, the zero
    convs, other (embeddings, conv_in)."""
    root = module.split(".")[0]
    return BLOCK_KINDS.get(root) or block_of(module)
