"""Reports -> rich tables in the terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from trtkit.inspector.onnx_report import OnnxReport
from trtkit.inspector.report import Comparison, EngineReport

PREC_STYLE = {"INT8": "bold green", "FP8": "bold cyan", "INT4": "green", "FP4": "cyan", "FP16": "yellow",
              "BF16": "yellow", "FP32": "red", "?": "dim"}
OUTCOME_STYLE = {"8-bit": "green", "fell back": "bold red", "unknown": "dim", "fused": "green",
                 "not fused": "bold red"}


def _table(console: Console, *cols: str, title: str) -> Table:
    console.print(f"[bold]{title}[/]")
    return Table(*cols)


def _p(prec: str | None) -> str:
    prec = prec or "-"
    style = PREC_STYLE.get(prec, "")
    return f"[{style}]{prec}[/]" if style else prec


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def render(report: Any, console: Console, *, all_layers: bool = True) -> None:
    if isinstance(report, OnnxReport):
        render_onnx(report, console)
    elif isinstance(report, EngineReport):
        render_engine(report, console, all_layers=all_layers)
    elif isinstance(report, Comparison):
        render_compare(report, console)
    else:  # pragma: no cover - inspect() returns one of the three
        raise TypeError(type(report))


def render_onnx(report: OnnxReport, console: Console) -> None:
    console.print(f"[bold]Q/DQ coverage[/] of {report.scan.path}")
    if report.coverage is not None:
        try:
            from trtkit.graph.coverage import render_coverage

            render_coverage(report.coverage, console)
            return
        except ImportError:
            pass
    # Per-node summary where the graph room's coverage renderer is not there.
    t = _table(console, "kind", "nodes", "INT8", "FP8", "not quantized", title="quantized nodes by kind")
    for kind, d in report.scan.summary().items():
        q = d.get("int8", 0) + d.get("fp8", 0)
        t.add_row(kind, str(d["total"]), str(d.get("int8", 0)), str(d.get("fp8", 0)), str(d["total"] - q))
    console.print(t)
    blocks: dict[str, dict[str, int]] = {}
    for n in report.scan.nodes:
        d = blocks.setdefault(n.block, {"total": 0, "q": 0})
        d["total"] += 1
        d["q"] += n.quantized
    t = _table(console, "block", "nodes", "quantized", title="by UNet block")
    for b, d in blocks.items():
        t.add_row(b, str(d["total"]), str(d["q"]))
    console.print(t)


def render_engine(r: EngineReport, console: Console, *, all_layers: bool = True) -> None:
    j = r.to_json()
    console.print(f"[bold]Engine[/] {r.src.plan}  backend {j['backend']} {j['tensorrt_version'] or '?'}  "
                  f"precision {j['precision'] or '?'}  "
                  + (f"layers from: {r.src.source}" if r.src.source != "none" else "no layer information (see the notes)"))
    if j["metadata_summary"]:
        t = Table(show_header=False, box=None, padding=(0, 2))
        for label, text in j["metadata_summary"]:
            t.add_row(f"[dim]{label}[/]", text)
        console.print(t)
    for note in j["notes"]:
        console.print(f"  [yellow]note[/] {note}")
    if not r.layers:
        return
    s = j["summary"]
    t = _table(console, "precision", "layers", title=f"{s['layers']} layers by precision ({j['layer_schema']}, "
                                            f"{j['verbosity']})")
    for prec, n in s["by_precision"].items():
        t.add_row(_p(prec), str(n))
    console.print(t)
    cs = s["compute_share"]
    t = _table(console, "precision", "share", title=f"share of UNet compute by precision (by {cs['basis']}; "
                                          f"{cs['compute_layers']} compute layers)")
    for prec, share in cs["share"].items():
        t.add_row(_p(prec), _pct(share))
    console.print(t)
    if cs["basis"] == "flops" and cs["layers_without_flops"]:
        console.print(f"  {cs['layers_without_flops']} compute layers have no FLOP estimate (no dimensions, and no ONNX "
                      "shapes to estimate from) "
                      "and are left out of the shares")
    if r.attention:
        t = _table(console, "attention module", "fused", "detail", title="fused attention per attention block")
        for a in r.attention:
            t.add_row(a.module, f"[{OUTCOME_STYLE.get(a.status, '')}]{a.status}[/]", a.detail)
        console.print(t)
    if r.crosscheck:
        counts: dict[str, int] = {}
        for c in r.crosscheck:
            counts[c.outcome] = counts.get(c.outcome, 0) + 1
        t = _table(console, "ONNX node", "kind", "asked", "ran", "outcome", "likely reason", title="Q/DQ cross-check: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        for c in r.crosscheck:
            t.add_row(c.node, c.kind, c.expected.upper(), _p(c.precision),
                      f"[{OUTCOME_STYLE.get(c.outcome, '')}]{c.outcome}[/]", c.reason)
        console.print(t)
    if all_layers:
        timed = r.src.timings_ms is not None
        cols = ["#", "layer", "type", "in", "out", "tactic", "ONNX nodes"] + (["ms"] if timed else [])
        t = _table(console, *cols, title="layers")
        for x in r.layers:
            ins = ", ".join(f"{i.dtype or '?'} {i.format}".strip() for i in x.inputs[:2])
            outs = ", ".join(f"{o.dtype or '?'} {o.format}".strip() for o in x.outputs[:1])
            row = [str(x.index), x.name if len(x.name) < 90 else x.name[:87] + "...", x.type or x.kind,
                   ins, outs, (x.tactic[:40] + "...") if len(x.tactic) > 43 else x.tactic, str(len(x.onnx_nodes))]
            if timed:
                ms = (r.src.timings_ms or {}).get(x.name)
                row.append(f"{ms:.3f}" if ms is not None else "")
            t.add_row(*row)
        console.print(t)


def render_compare(c: Comparison, console: Console) -> None:
    from trtkit.inspector.compare import same_file, side_by_side, without_layers

    j = c.to_json()
    console.print(f"[bold]Compare[/] A={j['plans'][0]}  B={j['plans'][1]}")
    if same_file(c.a.src.plan, c.b.src.plan):
        console.print("  A and B are the same plan (identical bytes)")
    missing = without_layers(c.a, c.b)
    rows = side_by_side(c.a, c.b)
    differ = [r for r in rows if not r[3]]
    t = _table(console, "", "A", "B", "", title="what the metadata says" + (
        f" ({len(differ)} of {len(rows)} rows differ)" if differ else " (no difference)"))
    for label, va, vb, same in rows:
        t.add_row(f"[dim]{label}[/]", va, vb, "" if same else "[bold yellow]differs[/]")
    console.print(t)
    if missing:
        side = " and ".join(missing)
        why = next((n for r in (c.a, c.b) if not r.layers for n in r.src.notes), "")
        console.print(f"  [yellow]note[/] nothing to compare layer by layer: {side} "
                      f"{'has' if len(missing) == 1 else 'have'} no layer information" + (f" ({why})" if why else ""))
        return
    t = _table(console, "precision", "A layers", "B layers", "A compute share", "B compute share", title="summary")
    sa, sb = j["a"], j["b"]
    precs = dict.fromkeys([*sa["by_precision"], *sb["by_precision"]])
    for p in precs:
        t.add_row(_p(p), str(sa["by_precision"].get(p, 0)), str(sb["by_precision"].get(p, 0)),
                  _pct(sa["compute_share"]["share"].get(p, 0.0)), _pct(sb["compute_share"]["share"].get(p, 0.0)))
    console.print(t)
    diff = [r for r in c.rows if not r["same"]]
    t = _table(console, "ONNX node", "A", "B", "A layer type", "B layer type", title=f"{len(c.rows)} compute nodes matched; {len(diff)} differ in precision")
    for r in diff:
        t.add_row(r["node"], _p(r["a_precision"]), _p(r["b_precision"]), r["a_type"] or "-", r["b_type"] or "-")
    console.print(t)
