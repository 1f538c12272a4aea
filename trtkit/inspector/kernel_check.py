"""Did the quantization reach the kernels: per attention module, fused or not; per Q/DQ-carrying ONNX
node, an 8-bit kernel or a fallback with its likely reason. Engine layers (inspector/layers.py) against
the ONNX scan (inspector/onnx_report.py); `report.py` puts the results in an EngineReport.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from trtkit.inspector.layers import ATTENTION_HINTS, LOW_BIT, Layer
from trtkit.inspector.onnx_report import ATTENTION_NODE, OnnxScan, module_of, node_block
from trtkit.inspector.rows import JsonRow


@dataclass(frozen=True)
class AttentionStatus(JsonRow):
    module: str
    block: str
    status: str  # "fused" | "not fused" | "unknown"
    detail: str
    layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class CrossCheck(JsonRow):
    node: str
    kind: str
    module: str
    block: str
    expected: str  # "int8" / "fp8"
    outcome: str  # "8-bit" | "fell back" | "unknown"
    precision: str  # what the layer ran in
    layer: str | None
    reason: str


def _block_order(block: str) -> tuple[int, str]:
    order = ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block", "up_blocks",
             "conv_norm_out", "conv_out")
    for i, p in enumerate(order):
        if block.startswith(p):
            return i, block
    return len(order), block


def _node_index(layers: tuple[Layer, ...]) -> dict[str, list[Layer]]:
    idx: dict[str, list[Layer]] = defaultdict(list)
    for x in layers:
        for n in x.onnx_nodes:
            idx[n].append(x)
    return idx


def attention_status(layers: tuple[Layer, ...], scan: OnnxScan | None) -> list[AttentionStatus]:
    """Per attention module: did Q·Kᵀ, Softmax and ·V end in one fused attention kernel?"""
    idx = _node_index(layers)
    cores: dict[str, tuple[str, tuple[str, ...]]] = {}
    if scan is not None:
        for a in scan.attention:
            cores[a.module] = (a.block, a.nodes)
    else:  # from the node names the layers carry
        found: dict[str, set[str]] = defaultdict(set)
        for n in idx:
            m = ATTENTION_NODE.match(n)
            if m:
                found[m.group("module")].add(n)
        for mod, names in found.items():
            cores[module_of(mod + "/x", "/unet/")] = (node_block(mod + "/x"), tuple(sorted(names)))
    out = []
    names_only = bool(layers) and all(not x.detailed for x in layers)
    for module, (block, nodes) in cores.items():
        holders = {id(x): x for n in nodes for x in idx.get(n, [])}
        hl = tuple(holders.values())
        if not hl or any(n not in idx for n in nodes):
            why = ("layer names only: a Myelin region names just its first and last node" if names_only else
                   "the layer information does not list these nodes")
            out.append(AttentionStatus(module, block, "unknown", why, tuple(x.name for x in hl)))
            continue
        if len(hl) == 1:
            x = hl[0]
            hint = next((h for h in ATTENTION_HINTS if h in x.tactic.lower() or h in x.type.lower()), None)
            if hint:
                out.append(AttentionStatus(module, block, "fused", f"one {x.type or 'layer'} layer, "
                                           f"{x.precision}, tactic {x.tactic or '?'}", (x.name,)))
            elif x.kind == "myelin":
                out.append(AttentionStatus(module, block, "fused", f"one Myelin region ({x.precision}); the "
                                           "kernel name does not say MHA", (x.name,)))
            else:
                out.append(AttentionStatus(module, block, "unknown", f"one {x.type or 'layer'} layer "
                                           "with no attention tactic", (x.name,)))
            continue
        out.append(AttentionStatus(module, block, "not fused", f"{len(hl)} separate layers: "
                                   + ", ".join(sorted({x.type or x.kind for x in hl})), tuple(x.name for x in hl)))
    return sorted(out, key=lambda a: (_block_order(a.block), a.module))


def cross_check(layers: tuple[Layer, ...], scan: OnnxScan) -> list[CrossCheck]:
    """For each Q/DQ-carrying linear/conv/attention node: 8-bit kernel or fallback, and the likely reason."""
    idx = _node_index(layers)
    reformat_for: dict[str, list[Layer]] = defaultdict(list)
    for x in layers:
        if x.reformat_for:
            reformat_for[x.reformat_for].append(x)
    producers_of: dict[str, Layer] = {}
    for x in layers:
        for t in x.outputs:
            producers_of[t.name] = x
    out = []
    for q in scan.quantized:
        holders = idx.get(q.node, [])
        expected = q.qtype or "?"
        if not holders:
            out.append(CrossCheck(q.node, q.kind, q.module, q.block, expected, "unknown", "?", None,
                                  "no layer lists this ONNX node (names-only layer information, or the node "
                                  "was folded away)"))
            continue
        x = next((h for h in holders if h.kind not in ("qdq", "reformat")), holders[0])
        prec = x.precision
        if prec in LOW_BIT:
            note = "" if prec.lower() == expected else f" ({prec} where the ONNX asked {expected.upper()})"
            out.append(CrossCheck(q.node, q.kind, q.module, q.block, expected, "8-bit", prec, x.name,
                                  f"{x.type or x.kind} kernel{note}"))
            continue
        if prec == "?":
            out.append(CrossCheck(q.node, q.kind, q.module, q.block, expected, "unknown", prec, x.name,
                                  "layer names only: precision not recorded"))
            continue
        if x.kind == "myelin" or x.type.lower() == "myelin":
            out.append(CrossCheck(q.node, q.kind, q.module, q.block, expected, "unknown", prec, x.name,
                                  "inside a Myelin region: its I/O is " + prec + ", the kernels inside are not "
                                  "listed"))
            continue
        out.append(CrossCheck(q.node, q.kind, q.module, q.block, expected, "fell back", prec, x.name,
                              _fallback_reason(q, x, idx, reformat_for, producers_of)))
    return out


def _fallback_reason(q: Any, x: Layer, idx: dict[str, list[Layer]], reformat_for: dict[str, list[Layer]],
                     producers_of: dict[str, Layer]) -> str:
    if q.kind in ("linear", "conv") and not (q.act_q and q.weight_q):
        side = "weight" if q.weight_q else "activation"
        return f"missing pair: only the {side} has Q/DQ, so TensorRT cannot pick an 8-bit kernel"
    standalone = [h for f in q.feeders for h in idx.get(f, []) if h.kind == "qdq" and h is not x]
    if standalone:
        return f"unfused Q/DQ: {standalone[0].name} ran as its own layer instead of fusing into the {q.kind}"
    ref = reformat_for.get(x.name, [])
    for t in x.inputs:
        p = producers_of.get(t.name)
        if p is not None and p.kind == "reformat":
            ref.append(p)
    ref += [h for f in q.feeders for h in idx.get(f, []) if h.kind == "reformat"]
    if ref:
        return (f"reformat: {ref[0].name} converts the input to {x.inputs[0].dtype if x.inputs else '?'} "
                "in front of it")
    return f"TensorRT chose a {x.precision} kernel (no faster or no supported 8-bit tactic for this shape)"
