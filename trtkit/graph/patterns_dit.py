"""Q/DQ rules for DiT transformers (FLUX.1 and SD3.x), beside the UNet's (trtkit/graph/choice.py).

The finders of patterns.py already name every match after its diffusers module; what differs for a
DiT is which modules the levels admit, what stays in high precision and why, the head size where the
graph hides it, and how coverage groups modules. A graph is a DiT when its export metadata carries
`trtkit.dit_dims` (trtkit/exporter.py).

Blocks and modules:
* joint (MM-DiT) blocks `transformer_blocks.N`: adaLN modulation `norm1.linear` / `norm1_context.linear`,
  image q/k/v `attn.to_q|to_k|to_v`, text q/k/v `attn.add_q_proj|add_k_proj|add_v_proj`, outputs
  `attn.to_out.0` / `attn.to_add_out`, MLPs `ff.net.0.proj`, `ff.net.2` (and `ff_context.*`); SD3.5's
  dual attention `attn2.*`; the attention BMMs of `attn` (and `attn2`);
* single-stream blocks `single_transformer_blocks.N` (FLUX): `norm.linear`, `attn.to_q|to_k|to_v`,
  `proj_mlp`, and `proj_out` (attention output and MLP output in one linear);
* embedders and the final layer, kept high precision (DIT_EXCLUDE, with reasons).
Levels as for the UNet: 2 the MLP linears, 2.5 adds q/k/v, 3 every linear in the blocks (attention
outputs, adaLN modulation), 4 (FP8) adds the attention BMMs when the head size is a multiple of 16
(FLUX.1: 128, SD3.5: 64).
"""

from __future__ import annotations

import json
from dataclasses import replace

from trtkit.graph.patterns import Matches, WeightedMatch

META_DIT_DIMS = "trtkit.dit_dims"  # written by the exporter (trtkit/exporter.py)

# Top-level modules kept in high precision, with why (matched as the module or its children only, so the
# single blocks' own `proj_out` is not the final `proj_out`).
DIT_EXCLUDE: tuple[tuple[str, str], ...] = (
    ("x_embedder", "embedder: the patch embedding reads the raw latents (the UNet's conv_in)"),
    ("pos_embed", "embedder: the patch embedding reads the raw latents (the UNet's conv_in)"),
    ("context_embedder", "embedder: projects the T5 text embeddings, whose outliers 8-bit clips"),
    ("time_text_embed", "embedder: timestep, guidance and pooled-text MLPs (small, feed every adaLN)"),
    ("norm_out", "final layer: the output adaLN modulation"),
    ("proj_out", "final layer: the output projection to latents"),
)
MLP_LEAVES = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp")
QKV_LEAVES = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
BLOCK_KINDS = {"transformer_blocks": "joint blocks", "single_transformer_blocks": "single blocks"}


def is_dit(meta: dict[str, str]) -> bool:
    """A DiT transformer (a T5 exported from a DiT folder carries the sizes too, but not these rules)."""
    return META_DIT_DIMS in meta and meta.get("trtkit.component", "transformer") == "transformer"


def head_dim(meta: dict[str, str]) -> int | None:
    try:
        v = json.loads(meta[META_DIT_DIMS]).get("head_dim")
    except (KeyError, json.JSONDecodeError, AttributeError):
        return None
    return int(v) if v else None


def refine(matches: Matches, meta: dict[str, str]) -> Matches:
    """Head sizes the graph hides (FLUX's RoPE and q/k RMSNorm sit between the head split and the BMM)
    from the transformer's config."""
    head = head_dim(meta)
    if head is None:
        return matches
    matches.attention = [a if a.head_size is not None else replace(a, head_size=head) for a in matches.attention]
    return matches


def exclusion(module: str) -> str | None:
    """Why a module stays in high precision by default, or None."""
    for root, why in DIT_EXCLUDE:
        if module == root or module.startswith(root + "."):
            return f"default exclusion ({root}): {why}"
    return None


def level_admits(m: WeightedMatch, level: float) -> tuple[bool, str]:
    return admits(m.module, m.kind, level)


def admits(mod: str, kind: str, level: float) -> tuple[bool, str]:
    """The level rule for a conv or linear module (the graph pass and the torch calibration share it)."""
    if kind == "conv":
        return True, "conv (level >= 1)"
    if any(mod.endswith("." + leaf) for leaf in MLP_LEAVES):
        need, what = 2.0, "MLP linear"
    elif mod.split(".")[-1] in QKV_LEAVES:
        need, what = 2.5, "q/k/v projection"
    elif mod.endswith(("norm1.linear", "norm1_context.linear", "norm.linear")):
        need, what = 3.0, "adaLN modulation linear"
    elif mod.endswith(("to_out.0", "to_add_out", "proj_out")):
        need, what = 3.0, "attention output linear"
    else:
        need, what = 3.0, "linear"
    if level >= need:
        return True, f"{what} (level >= {need:g})"
    return False, f"level {level:g} quantizes no {what} (needs level >= {need:g})"


def block_kind(module: str) -> str:
    """Coverage groups of a DiT: joint blocks, single blocks, embedders, final layer."""
    root = module.split(".")[0]
    if root in BLOCK_KINDS:
        return BLOCK_KINDS[root]
    if root in ("norm_out", "proj_out"):
        return "final layer"
    if root in ("x_embedder", "pos_embed", "context_embedder", "time_text_embed"):
        return "embedders"
    return "other"
