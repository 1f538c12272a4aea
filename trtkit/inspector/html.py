"""Reports -> ONE self-contained HTML page (inline CSS, inline SVG, a few lines of inline JS; no external
resources), with the per-block precision picture. Written by hand with `html.escape` rather than a template
engine: the page is small and a dependency would only add an install step.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from trtkit._files import check_output, write_text_atomic
from trtkit.inspector.kernel_check import _block_order
from trtkit.inspector.onnx_report import OnnxReport, coverage_json
from trtkit.inspector.report import Comparison, EngineReport

COLORS = {"INT8": "#2e7d32", "FP8": "#00838f", "INT4": "#66bb6a", "FP4": "#4dd0e1", "FP16": "#f9a825",
          "BF16": "#ffb300", "FP32": "#c62828", "quantized": "#2e7d32", "not quantized": "#bdbdbd"}
OUTCOME_CLASS = {"8-bit": "ok", "fused": "ok", "fell back": "bad", "not fused": "bad", "unknown": "unk"}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#212121;background:#fafafa}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#555}.note{background:#fff8e1;border-left:4px solid #f9a825;padding:4px 10px;margin:4px 0}
table{border-collapse:collapse;background:#fff;margin:6px 0}td,th{border:1px solid #e0e0e0;padding:3px 8px;max-width:460px;overflow-wrap:anywhere;
text-align:left;vertical-align:top}th{background:#f5f5f5}td.num{text-align:right}
.ok{color:#2e7d32;font-weight:600}.bad{color:#c62828;font-weight:600}.unk{color:#757575}
.chip{display:inline-block;padding:0 6px;border-radius:3px;color:#fff;font-size:12px}
.legend span{margin-right:12px}.small{font-size:12px;color:#666}code{font-size:12px}
input{padding:3px 6px;margin:4px 0;width:320px}
"""

# Any script error or console.error marks the page title, so a headless test can see it.
GUARD_JS = """
window.addEventListener('error', function (e) { document.title = 'JS-ERROR: ' + e.message; });
(function () { var orig = console.error; console.error = function () {
  document.title = 'JS-ERROR: ' + Array.prototype.join.call(arguments, ' '); orig.apply(console, arguments); }; })();
"""

FILTER_JS = """
function filterRows(input, tableId) {
  var q = input.value.toLowerCase(); var rows = document.getElementById(tableId).tBodies[0].rows;
  for (var i = 0; i < rows.length; i++) {
    rows[i].style.display = rows[i].textContent.toLowerCase().indexOf(q) >= 0 ? '' : 'none'; }
}
document.addEventListener('DOMContentLoaded', function () { document.body.setAttribute('data-ready', '1'); });
"""


def e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def chip(prec: str | None) -> str:
    p = prec or "?"
    return f'<span class="chip" style="background:{COLORS.get(p, "#9e9e9e")}">{e(p)}</span>'


def table(headers: list[str], rows: list[list[str]], table_id: str | None = None) -> str:
    """Cells are already-escaped HTML."""
    tid = f' id="{e(table_id)}"' if table_id else ""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def stacked_bars(rows: dict[str, dict[str, float]], unit: str, width: int = 560) -> str:
    """One horizontal bar per row (UNet block), split by key (precision), as inline SVG."""
    if not rows:
        return '<p class="small">nothing to draw</p>'
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    label_w, bar_h, gap = 150, 18, 6
    height = len(rows) * (bar_h + gap) + 10
    parts = [f'<svg width="{label_w + width + 120}" height="{height}" '
             f'role="img" aria-label="per-block precision">']
    for i, (name, vals) in enumerate(rows.items()):
        y = 5 + i * (bar_h + gap)
        total = sum(vals.values()) or 1.0
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" font-size="12">{e(name)}</text>')
        x = float(label_w)
        for k in keys:
            v = vals.get(k, 0.0)
            if v <= 0:
                continue
            w = width * v / total
            parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{COLORS.get(k, "#9e9e9e")}">'
                         f'<title>{e(name)}: {e(k)} {100 * v / total:.1f}% of {e(unit)}</title></rect>')
            x += w
        parts.append(f'<text x="{label_w + width + 6}" y="{y + 13}" font-size="11" fill="#555">'
                     f'{e(_fmt_total(sum(vals.values()), unit))}</text>')
    parts.append("</svg>")
    legend = "".join(f"<span>{chip(k)}</span>" for k in keys)
    return "".join(parts) + f'<div class="legend small">{legend}</div>'


def _fmt_total(v: float, unit: str) -> str:
    if unit == "FLOPs":
        return f"{v / 1e9:.2f} GFLOP" if v >= 1e8 else f"{v / 1e6:.1f} MFLOP"
    return f"{v:g} {unit}"


def page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><script>{GUARD_JS}</script><style>{CSS}</style></head>"
            f"<body>{body}<script>{FILTER_JS}</script></body></html>\n")


def _engine_sections(r: EngineReport, prefix: str = "") -> str:
    j = r.to_json()
    out = [f'<p class="meta">backend <b>{e(j["backend"])}</b> {e(j["tensorrt_version"] or "?")} &middot; '
           f'precision <b>{e(j["precision"] or "?")}</b> &middot; '
           + (f'layer information from <b>{e(j["source"])}</b> ({e(j["layer_schema"] or "?")}, '
              f'{e(j["verbosity"] or "?")})' if j["source"] != "none" else "<b>no layer information</b> (see the notes)")
           + (f' &middot; ONNX <code>{e(j["onnx"])}</code>' if j["onnx"] else "") + "</p>"]
    if j["metadata_summary"]:
        out.append("<h2>Engine metadata</h2>" + table(["field", "value"], [[e(k), e(v)] for k, v in j["metadata_summary"]]))
    out += [f'<div class="note">{e(n)}</div>' for n in j["notes"]]
    if not r.layers:
        return "".join(out)
    s = j["summary"]
    cs = s["compute_share"]
    out.append("<h2>Summary</h2>")
    out.append(table(["precision", "layers", f"share of UNet compute (by {cs['basis']})"],
                     [[chip(p), f'<span class="num">{n}</span>', f'{100 * cs["share"].get(p, 0.0):.1f}%']
                      for p, n in s["by_precision"].items()]))
    if cs["basis"] == "flops" and cs["layers_without_flops"]:
        out.append(f'<p class="small">{cs["layers_without_flops"]} compute layers have no FLOP estimate (no '
                   "dimensions, and no ONNX shapes to estimate from) and are not in the shares.</p>")
    unit = "FLOPs" if cs["basis"] == "flops" else "layers"
    out.append(f"<h2>Per-block precision</h2><p class='small'>Compute of each UNet block by the precision its "
               f"layers ran in ({e(unit)}).</p>")
    out.append(stacked_bars(s["blocks"], unit))
    if r.attention:
        out.append("<h2>Fused attention per attention block</h2>")
        out.append(table(["attention module", "fused", "detail"],
                         [[f"<code>{e(a.module)}</code>", f'<span class="{OUTCOME_CLASS[a.status]}">{e(a.status)}</span>',
                           e(a.detail)] for a in r.attention]))
    if r.crosscheck:
        counts: dict[str, int] = {}
        for c in r.crosscheck:
            counts[c.outcome] = counts.get(c.outcome, 0) + 1
        out.append("<h2>Q/DQ cross-check</h2><p class='small'>Every ONNX node that carries Q/DQ, and whether "
                   "TensorRT ran it in an 8-bit kernel: " + e(", ".join(f"{k} {v}" for k, v in counts.items()))
                   + "</p>")
        out.append(table(["ONNX node", "kind", "asked", "ran", "outcome", "likely reason"],
                         [[f"<code>{e(c.node)}</code>", e(c.kind), e(c.expected.upper()), chip(c.precision),
                           f'<span class="{OUTCOME_CLASS[c.outcome]}">{e(c.outcome)}</span>', e(c.reason)]
                          for c in r.crosscheck]))
    tid = f"{prefix}layers"
    timed = r.src.timings_ms is not None
    out.append(f'<h2>Layers ({len(r.layers)})</h2><input placeholder="filter layers" '
               f'oninput="filterRows(this, \'{tid}\')">')
    rows = []
    for x, lj in zip(r.layers, j["layers"], strict=True):
        ins = "<br>".join(f"{chip(t.dtype)} {e(t.format)}" for t in x.inputs)
        outs = "<br>".join(f"{chip(t.dtype)} {e(t.format)}" for t in x.outputs)
        row = [str(x.index), f"<code>{e(x.name)}</code>", e(x.type or x.kind), chip(x.precision), ins, outs,
               f"<code>{e(x.tactic)}</code>", "<br>".join(f"<code>{e(n)}</code>" for n in x.onnx_nodes),
               e(lj["block"])]
        if timed:
            row.append(f'{lj["time_ms"]:.3f}' if lj["time_ms"] is not None else "")
        rows.append(row)
    out.append(table(["#", "layer", "type", "precision", "inputs", "outputs", "tactic", "ONNX nodes", "block"]
                     + (["ms"] if timed else []), rows, tid))
    return "".join(out)


def _onnx_sections(r: OnnxReport) -> str:
    scan = r.scan
    out = [f'<p class="meta">scope <code>{e(scan.scope)}</code></p>', "<h2>Quantized nodes by kind</h2>"]
    out.append(table(["kind", "nodes", "INT8", "FP8", "not quantized"],
                     [[e(k), str(d["total"]), str(d.get("int8", 0)), str(d.get("fp8", 0)),
                       str(d["total"] - d.get("int8", 0) - d.get("fp8", 0))] for k, d in scan.summary().items()]))
    blocks: dict[str, dict[str, float]] = {}
    for n in scan.nodes:
        d = blocks.setdefault(n.block, {})
        key = (n.qtype or "").upper() if n.qtype else "not quantized"
        d[key] = d.get(key, 0.0) + 1
    out.append("<h2>Per-block picture</h2><p class='small'>Linear, conv and attention-matmul nodes of each "
               "UNet block by the Q/DQ type in front of them.</p>")
    out.append(stacked_bars(dict(sorted(blocks.items(), key=lambda kv: _block_order(kv[0]))), "nodes"))
    if r.coverage is not None:
        out.append(_coverage_sections(r.coverage))
    out.append("<h2>Nodes</h2><input placeholder=\"filter nodes\" oninput=\"filterRows(this, 'nodes')\">")
    out.append(table(["node", "op", "kind", "module", "block", "Q/DQ"],
                     [[f"<code>{e(n.node)}</code>", e(n.op), e(n.kind), f"<code>{e(n.module)}</code>", e(n.block),
                       chip(n.qtype.upper()) if n.qtype else "-"] for n in scan.nodes], "nodes"))
    return "".join(out)


def _coverage_sections(cov: Any) -> str:
    """The graph room's CoverageReport: per block and kind, and why the rest is not quantized."""
    def cell(t: dict[str, Any]) -> str:
        if not t.get("total"):
            return "-"
        types = ", ".join(t.get("types") or {})
        return f"{t['quantized']}/{t['total']}" + (f" {types}" if types else "")

    out = ["<h2>Coverage per module (graph pass)</h2>"]
    head = getattr(cov, "precision", None)
    if head:
        out.append(f"<p class='small'>{e(str(head).upper())}, level {e(getattr(cov, 'level', '?'))}</p>")
    try:
        by_block, by_kind = cov.by_block(), cov.by_kind()
        kinds = list(by_kind)
        rows = [[e(b)] + [e(cell(per.get(k, {}))) for k in kinds] for b, per in by_block.items()]
        rows.append(["<b>total</b>"] + [f"<b>{e(cell(by_kind[k]))}</b>" for k in kinds])
        out.append(table(["block", *kinds], rows))
        reasons = cov.reasons()
        if reasons:
            out.append("<h2>Not quantized, and why</h2>")
            out.append(table(["modules", "reason"], [[str(n), e(r)] for r, n in reasons.items()]))
    except (AttributeError, TypeError, KeyError):  # another CoverageReport shape: show its JSON
        out.append("<pre>" + e(json.dumps(coverage_json(cov), indent=1, default=str)[:20000]) + "</pre>")
    out += [f'<div class="note">{e(n)}</div>' for n in getattr(cov, "notes", []) or []]
    return "".join(out)


def _compare_sections(c: Comparison) -> str:
    j = c.to_json()
    sa, sb = j["a"], j["b"]
    out = [f'<p class="meta">A = <code>{e(j["plans"][0])}</code><br>B = <code>{e(j["plans"][1])}</code></p>']
    for side in ("a", "b"):
        out += [f'<div class="note">{side.upper()}: {e(n)}</div>' for n in j["notes"][side]]
    precs = list(dict.fromkeys([*sa["by_precision"], *sb["by_precision"]]))
    out.append("<h2>Summary</h2>")
    out.append(table(["precision", "A layers", "B layers", "A compute share", "B compute share"],
                     [[chip(p), str(sa["by_precision"].get(p, 0)), str(sb["by_precision"].get(p, 0)),
                       f'{100 * sa["compute_share"]["share"].get(p, 0.0):.1f}%',
                       f'{100 * sb["compute_share"]["share"].get(p, 0.0):.1f}%'] for p in precs]))
    both = {f"A {k}": v for k, v in sa["blocks"].items()} | {f"B {k}": v for k, v in sb["blocks"].items()}
    out.append("<h2>Per-block precision</h2>")
    out.append(stacked_bars(dict(sorted(both.items(), key=lambda kv: (kv[0][2:], kv[0]))),
                            "FLOPs" if sa["compute_share"]["basis"] == "flops" else "layers"))
    diff = [r for r in c.rows if not r["same"]]
    out.append(f"<h2>Layer by layer</h2><p class='small'>{len(c.rows)} compute nodes matched by ONNX node; "
               f"{len(diff)} differ in precision.</p>")
    out.append('<input placeholder="filter" oninput="filterRows(this, \'cmp\')">')
    out.append(table(["ONNX node", "block", "A", "B", "A layer", "B layer"],
                     [[f"<code>{e(r['node'])}</code>", e(r["block"]), chip(r["a_precision"]), chip(r["b_precision"]),
                       f"<code>{e(r['a_layer'])}</code>", f"<code>{e(r['b_layer'])}</code>"]
                      for r in sorted(c.rows, key=lambda r: r["same"])], "cmp"))
    return "".join(out)


def render_html(report: Any) -> str:
    if isinstance(report, EngineReport):
        return page(f"trtkit inspect {report.src.plan.name}",
                    f"<h1>Engine report: {e(report.src.plan.name)}</h1>" + _engine_sections(report))
    if isinstance(report, OnnxReport):
        return page(f"trtkit inspect {report.scan.path.name}",
                    f"<h1>Q/DQ coverage: {e(report.scan.path.name)}</h1>" + _onnx_sections(report))
    if isinstance(report, Comparison):
        return page("trtkit inspect: compare", "<h1>Engine comparison</h1>" + _compare_sections(report))
    raise TypeError(type(report))


def combined_html(title: str, sections: list[tuple[str, Any]]) -> str:
    """Several reports on one page (the demo: ONNX coverage + the engine report)."""
    body = [f"<h1>{e(title)}</h1>"]
    for i, (heading, rep) in enumerate(sections):
        body.append(f"<h2 style='font-size:18px'>{e(heading)}</h2>")
        if isinstance(rep, EngineReport):
            body.append(_engine_sections(rep, prefix=f"s{i}"))
        elif isinstance(rep, OnnxReport):
            body.append(_onnx_sections(rep).replace("'nodes'", f"'s{i}nodes'").replace('id="nodes"', f'id="s{i}nodes"'))
        elif isinstance(rep, Comparison):
            body.append(_compare_sections(rep))
        else:
            body.append(f"<p>{e(rep)}</p>")
    return page(title, "".join(body))


def html_output(path: str | Path, *inputs: str | Path | None) -> Path:
    """Check `inspect --html` before any work: a folder gets `<first input's stem>.html`; the page may
    not replace an input (a plan, its .json/.layers.json, an ONNX and its .data), a device node or FIFO."""
    files = [Path(p) for p in inputs if p is not None]
    around = [p.with_suffix(s) for p in files for s in (".json", ".layers.json")]
    around += [p.parent / (p.name + ".data") for p in files]
    return check_output(path, default_name=f"{files[0].stem}.html" if files else "report.html",
                        inputs=[*files, *around], what="HTML report")


def write_html(report: Any, path: str | Path) -> Path:
    """Write the page; a folder `path` gets report.html (the CLI names it after the input instead)."""
    path = check_output(path, default_name="report.html", what="HTML report")
    write_text_atomic(path, render_html(report))
    return path
