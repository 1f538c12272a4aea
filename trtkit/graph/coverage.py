"""Q/DQ coverage of an ONNX file: per kind (linear, conv, attention) and per UNet block, how many
ops are quantized, in which type, and why the others are not.

What is quantized is read from the graph itself (a DequantizeLinear on the weight and the activation,
or on all four attention BMM inputs); the reasons for the rest come from the decisions the Q/DQ pass
stored in the file's metadata (`trtkit.qdq`), or say plainly that the graph carries no Q/DQ there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_graphsurgeon as gs

from trtkit._files import load_onnx
from trtkit.graph import module_names, patterns
from trtkit.graph.qdq import META_KEY

KINDS = ("linear", "conv", "attention")


@dataclass(frozen=True)
class CoverageItem:
    module: str
    kind: str
    block: str
    quantized: bool
    type: str | None  # int8 | fp8 | "int8 weight-only" ...
    reason: str


@dataclass
class CoverageReport:
    path: Path
    items: list[CoverageItem]
    precision: str | None = None  # from the pass's metadata, if any
    level: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def nothing_matched(self) -> bool:
        return not self.items

    def _tally(self, items: list[CoverageItem]) -> dict[str, Any]:
        types: dict[str, int] = {}
        for i in items:
            if i.quantized and i.type:
                types[i.type] = types.get(i.type, 0) + 1
        return {"total": len(items), "quantized": sum(i.quantized for i in items), "types": types}

    def by_kind(self) -> dict[str, dict[str, Any]]:
        return {k: self._tally([i for i in self.items if i.kind == k]) for k in KINDS}

    def blocks(self) -> list[str]:
        def key(b: str) -> tuple[bool, str, int, int]:
            order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2,
                     "embedders": 0, "joint blocks": 1, "single blocks": 2, "final layer": 3}  # DiT kinds
            parts = b.split(".")
            num = parts[-1] if parts[-1].isdigit() else ""
            head = parts[-2] if num else parts[-1]
            prefix = ".".join(parts[: -2 if num else -1])
            return b == "other", prefix, order.get(head, 3), int(num) if num else 0

        return sorted({i.block for i in self.items}, key=key)

    def by_block(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {b: {k: self._tally([i for i in self.items if i.block == b and i.kind == k]) for k in KINDS}
                for b in self.blocks()}

    def unquantized(self) -> list[CoverageItem]:
        return [i for i in self.items if not i.quantized]

    def reasons(self) -> dict[str, int]:
        """Reason -> how many ops it accounts for (the reasons grouped)."""
        out: dict[str, int] = {}
        for i in self.unquantized():
            out[f"{i.kind}: {i.reason}"] = out.get(f"{i.kind}: {i.reason}", 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "precision": self.precision, "level": self.level,
            "nothing_matched": self.nothing_matched, "notes": self.notes,
            "by_kind": self.by_kind(), "by_block": self.by_block(),
            "items": [{"module": i.module, "kind": i.kind, "block": i.block, "quantized": i.quantized,
                       "type": i.type, "reason": i.reason} for i in self.items],
        }


def coverage(onnx_path: Path | str) -> CoverageReport:
    """Read an ONNX file (weights are not loaded) and report its Q/DQ coverage."""
    path = Path(onnx_path)
    model = load_onnx(path)
    meta = {p.key: p.value for p in model.metadata_props}
    decisions: dict[str, list[Any]] = {}
    report = CoverageReport(path=path, items=[])
    if META_KEY in meta:
        try:
            doc = json.loads(meta[META_KEY])
            decisions = doc.get("decisions", {})
            report.precision, report.level = doc.get("precision"), doc.get("level")
        except (json.JSONDecodeError, AttributeError):
            report.notes.append(f"metadata {META_KEY} is unreadable; reasons come from the graph only")
    with patterns.quiet_gs():
        graph = gs.import_onnx(model)
    m = patterns.find(graph, patterns.scope_of(meta))
    report.notes.extend(m.notes)
    from trtkit.graph import patterns_controlnet, patterns_dit

    block_of = patterns_dit.block_kind if patterns_dit.is_dit(meta) else (  # DiT, ControlNet: per block kind
        patterns_controlnet.block_kind if patterns_controlnet.is_controlnet(meta) else module_names.block_of)
    has_qdq = any(n.op in ("QuantizeLinear", "DequantizeLinear") for n in graph.nodes)

    def why(module: str, fallback: str) -> str:
        d = decisions.get(module)
        if d and not d[1]:
            return str(d[3])
        if d and d[1]:
            return "the pass quantized it, but the graph has no Q/DQ here now (edited afterwards?)"
        return fallback

    none_reason = "no Q/DQ in this graph" if not has_qdq else "no Q/DQ on its inputs"
    for w in (*m.linear, *m.conv):
        if w.weight_type and w.input_type:
            q, t, r = True, w.weight_type, "weight and activation quantized"
        elif w.weight_type:
            q, t, r = False, None, f"weight-only {w.weight_type} (activation not quantized)"
        else:
            q, t, r = False, None, why(w.module, none_reason)
        report.items.append(CoverageItem(w.module, w.kind, block_of(w.module), q, t, r))
    for a in m.attention:
        roles = a.quantized
        if len(roles) == 4 and len(set(roles.values())) == 1:
            q, t, r = True, next(iter(roles.values())), "Q, K, V and softmax output quantized"
        elif roles:
            q, t, r = False, None, f"only {', '.join(sorted(roles))} quantized (TensorRT fuses all four)"
        else:
            q, t, r = False, None, why(a.module, none_reason)
        report.items.append(CoverageItem(a.module, "attention", block_of(a.module), q, t, r))
    if report.nothing_matched:
        report.notes.append("nothing matched: no linear, conv or attention pattern in this graph")
    return report


def render_coverage(report: CoverageReport, console: Any, details: bool = False) -> None:
    """Rich tables: per kind, per block, and the reasons for what is not quantized."""
    from rich.table import Table

    title = f"Q/DQ coverage of {report.path.name}"
    if report.precision:
        title += f" ({report.precision.upper()}, level {report.level:g})"
    if report.nothing_matched:
        console.print(f"{title}: nothing matched (no linear, conv or attention pattern)")
        return

    def cell(t: dict[str, Any]) -> str:
        if not t["total"]:
            return "-"
        types = ", ".join(f"{k}" for k in t["types"])
        return f"{t['quantized']}/{t['total']}" + (f" {types}" if types else "")

    kinds = report.by_kind()
    tbl = Table(title=title)
    tbl.add_column("block")
    for k in KINDS:
        tbl.add_column(k, justify="right")
    for b, per in report.by_block().items():
        tbl.add_row(b, *(cell(per[k]) for k in KINDS))
    tbl.add_row("[bold]total[/bold]", *(f"[bold]{cell(kinds[k])}[/bold]" for k in KINDS))
    console.print(tbl)
    reasons = report.reasons()
    if reasons:
        rt = Table(title="not quantized, and why")
        rt.add_column("count", justify="right")
        rt.add_column("reason")
        for r, n in reasons.items():
            rt.add_row(str(n), r)
        console.print(rt)
    if details:
        dt = Table(title="per module")
        for c in ("module", "kind", "quantized", "reason"):
            dt.add_column(c)
        for i in report.items:
            dt.add_row(i.module, i.kind, i.type or "no", i.reason)
        console.print(dt)
    for note in report.notes:
        console.print(f"note: {note}")
