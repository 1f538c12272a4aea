"""`inspect(...)`: one path -> an ONNX coverage report or an engine report; two plans -> a comparison.

The engine report answers "did the quantization reach the kernels?": layers by precision, share of the
UNet's compute by precision, fused attention per attention block, and for every Q/DQ-carrying ONNX node
whether it ended in an 8-bit kernel, with the likely reason where it did not.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtkit.errors import TrtkitError
from trtkit.inspector.engine_report import EngineSource, load_engine
from trtkit.inspector.kernel_check import (
    AttentionStatus,
    CrossCheck,
    _block_order,
    _node_index,
    attention_status,
    cross_check,
)
from trtkit.inspector.layers import EIGHT_BIT, Layer
from trtkit.inspector.onnx_report import (
    OnnxReport,
    OnnxScan,
    node_block,
    onnx_report,
    scan_onnx,
)
from trtkit.inspector.plan_file import _get, check_onnx_for, meta_backend, meta_onnx

COMPUTE_KINDS = ("conv", "matmul", "attention", "myelin")


@dataclass
class EngineReport:
    src: EngineSource
    onnx: OnnxScan | None
    attention: list[AttentionStatus]
    crosscheck: list[CrossCheck]
    notes: list[str] = field(default_factory=list)
    _flops: dict[int, float | None] | None = field(default=None, repr=False)

    def opt_shapes(self) -> dict[str, list[int]]:
        """Each input's opt shape (profile 0): from the metadata, else the TensorRT 11 I/O tensors."""
        shapes: dict[str, list[int]] = {}
        for prof in (_get(self.src.metadata, "profiles") or [])[:1]:
            for name, rng in (prof.get("shapes") or {}).items() if isinstance(prof, dict) else []:
                if isinstance(rng, dict) and isinstance(rng.get("opt"), list):
                    shapes[name] = rng["opt"]
        for t in self.src.layers.io if self.src.layers else ():
            if t.name not in shapes and t.profiles and isinstance(t.profiles[0].get("OptShape"), list):
                shapes[t.name] = t.profiles[0]["OptShape"]
        return shapes

    def layer_flops(self, layer: Layer) -> float | None:
        """The layer's own estimate, else the FLOPs of the ONNX MatMul/Gemm/Conv nodes it holds (each node
        counted in one layer only), at the opt shapes."""
        if self._flops is None:
            own = {x.index: x.flops() for x in self.layers}
            missing = [x for x in self.layers if own[x.index] is None and x.kind in COMPUTE_KINDS]
            per_node: dict[str, float] = {}
            if missing and self.onnx is not None:
                from trtkit.inspector.onnx_report import node_flops

                per_node = node_flops(self.onnx.path, self.opt_shapes())
            taken = {n for x in self.layers if own[x.index] is not None for n in x.onnx_nodes}
            for x in missing:
                nodes = [n for n in x.onnx_nodes if n in per_node and n not in taken]
                taken.update(nodes)
                own[x.index] = sum(per_node[n] for n in nodes) if nodes else None
            self._flops = own
        return self._flops.get(layer.index)

    @property
    def layers(self) -> tuple[Layer, ...]:
        return self.src.layers.layers if self.src.layers else ()

    def layer_block(self, layer: Layer) -> str:
        blocks = Counter(node_block(n, self.onnx.scope if self.onnx else "/unet/") for n in layer.onnx_nodes)
        return blocks.most_common(1)[0][0] if blocks else "(io)"

    def by_precision(self) -> dict[str, int]:
        return dict(Counter(x.precision for x in self.layers).most_common())

    def by_kind(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter[str]] = defaultdict(Counter)
        for x in self.layers:
            out[x.kind][x.precision] += 1
        return {k: dict(v) for k, v in sorted(out.items())}

    def compute_share(self) -> dict[str, Any]:
        """Share of UNet compute by precision: FLOPs where the layer dimensions give them, else layer count."""
        compute = [x for x in self.layers if x.kind in COMPUTE_KINDS]
        flops: dict[str, float] = defaultdict(float)
        unestimated = []
        for x in compute:
            f = self.layer_flops(x)
            if f is None:
                unestimated.append(x)
            else:
                flops[x.precision] += f
        total = sum(flops.values())
        by_count = Counter(x.precision for x in compute)
        if total > 0:
            share = {k: v / total for k, v in sorted(flops.items(), key=lambda kv: -kv[1])}
            basis = "flops"
        else:
            n = sum(by_count.values()) or 1
            share = {k: v / n for k, v in by_count.most_common()}
            basis = "layer count"
        return {"basis": basis, "share": share, "flops": dict(flops), "compute_layers": len(compute),
                "layers_without_flops": len(unestimated) if basis == "flops" else len(compute),
                "by_count": dict(by_count)}

    def block_picture(self) -> dict[str, dict[str, float]]:
        """Per UNet block: weight (FLOPs, or 1 per compute layer) by precision, for the HTML picture."""
        out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for x in self.layers:
            if x.kind not in COMPUTE_KINDS:
                continue
            out[self.layer_block(x)][x.precision] += self.layer_flops(x) or 0.0
        if not any(sum(c.values()) for c in out.values()):  # no FLOPs anywhere: count layers
            out = defaultdict(lambda: defaultdict(float))
            for x in self.layers:
                if x.kind in COMPUTE_KINDS:
                    out[self.layer_block(x)][x.precision] += 1
        return {b: dict(c) for b, c in sorted(out.items(), key=lambda kv: _block_order(kv[0]))}

    def to_json(self) -> dict[str, Any]:
        meta = self.src.metadata
        built_by, version = meta_backend(meta)
        return {
            "kind": "engine", "plan": str(self.src.plan), "source": self.src.source,
            "backend": built_by or self.src.header.flavour, "tensorrt_version": version or self.src.header.version_str,
            "precision": _precision(meta), "metadata": meta, "metadata_summary": metadata_summary(meta),
            "layer_schema": self.src.layers.schema if self.src.layers else None,
            "verbosity": self.src.layers.verbosity if self.src.layers else None,
            "notes": self.src.notes + self.notes,
            "summary": {"layers": len(self.layers), "by_precision": self.by_precision(), "by_kind": self.by_kind(),
                        "compute_share": self.compute_share(), "blocks": self.block_picture()},
            "attention": [a.to_json() for a in self.attention],
            "crosscheck": [c.to_json() for c in self.crosscheck],
            "io": [t.to_json() for t in self.src.layers.io] if self.src.layers else [],
            "layers": [dict(x.to_json(), block=self.layer_block(x), flops=self.layer_flops(x),
                            time_ms=(self.src.timings_ms or {}).get(x.name)) for x in self.layers],
            "onnx": str(self.onnx.path) if self.onnx else None,
        }


def _dims(d: Any) -> str:
    return "x".join(str(v) for v in d) if isinstance(d, list) else str(d)


def metadata_summary(meta: dict[str, Any] | None) -> list[tuple[str, str]]:
    """What the engine's metadata file says, as (label, text) rows: read even where the plan cannot be."""
    if not meta:
        return []
    rows: list[tuple[str, str]] = []
    be = meta.get("backend")
    if isinstance(be, dict):
        rows.append(("built with", f"{be.get('module') or be.get('name')} {be.get('version', '?')}"
                     + (f", trtkit {meta['trtkit_version']}" if meta.get("trtkit_version") else "")))
    tgt = meta.get("target")
    if isinstance(tgt, dict):
        rows.append(("target", tgt.get("gpu") or ("compute capabilities " + ", ".join(
            map(str, tgt.get("compute_capabilities") or [])))))
    prec = meta.get("precision")
    if isinstance(prec, dict):
        asked = prec.get("requested")
        eng = prec.get("engine") or asked
        rows.append(("precision", f"{eng}{'' if eng == asked else f' (requested {asked})'}; Q/DQ types: {', '.join(prec.get('qdq_types') or []) or 'none'}"
                     f"; strongly typed: {prec.get('strongly_typed')}; builder flags: "
                     f"{', '.join(prec.get('builder_flags') or []) or 'none'}"))
    for prof in meta.get("profiles") or []:
        if isinstance(prof, dict) and isinstance(prof.get("shapes"), dict):
            shapes = "; ".join(f"{k} {_dims(v.get('min'))} / {_dims(v.get('opt'))} / {_dims(v.get('max'))}"
                               for k, v in prof["shapes"].items() if isinstance(v, dict))
            rows.append((f"profile {prof.get('name', '')} (min/opt/max)", shapes))
    io = meta.get("io")
    if isinstance(io, dict):
        for side in ("inputs", "outputs"):
            items = io.get(side) or []
            rows.append((side, ", ".join(f"{t.get('name')} {t.get('dtype')} {_dims(t.get('shape'))}"
                                          for t in items if isinstance(t, dict))))
    onnx = meta.get("onnx")
    if isinstance(onnx, dict) and onnx.get("path"):
        rows.append(("ONNX", str(onnx["path"])))
    kept = meta.get("qdq_onnx")
    if isinstance(kept, dict) and kept.get("path"):
        rows.append(("Q/DQ ONNX (parsed)", str(kept["path"])))
    if meta.get("build_seconds") is not None:
        rows.append(("build time", f"{meta['build_seconds']} s"))
    plan = meta.get("plan")
    if isinstance(plan, dict) and plan.get("bytes"):
        rows.append(("plan size", f"{plan['bytes'] / 2**20:.1f} MiB"))
    layers = meta.get("layers")
    if isinstance(layers, dict):
        rows.append(("layer information", "saved" if layers.get("saved") else str(layers.get("reason", "not saved"))))
    return rows


def _precision(meta: dict[str, Any] | None) -> str | None:
    p = _get(meta, "precision.engine", "precision.requested", "precision")
    if isinstance(p, dict):
        return None
    types = _get(meta, "precision.qdq_types")
    return f"{p} (Q/DQ {', '.join(types)})" if p and types else p


def engine_report(plan: str | Path, onnx: str | Path | None = None, backend: str | None = None,
                  profile_layers: bool = False, from_files: bool = False) -> EngineReport:
    plan = Path(plan)
    src = load_engine(plan, backend=backend, profile_layers=profile_layers, from_files=from_files)
    notes: list[str] = []
    onnx_path = Path(onnx) if onnx else meta_onnx(src.metadata, plan)
    if onnx and not Path(onnx).is_file():
        raise TrtkitError(f"--onnx file {onnx} does not exist")
    mismatch = check_onnx_for(Path(onnx), src.metadata, plan) if onnx else None
    if mismatch:
        notes.append(mismatch)
    scan = scan_onnx(onnx_path) if onnx_path else None
    if scan is None:
        notes.append("no ONNX model (pass --onnx model.onnx, or build with trtkit so the metadata records it): "
                     "no cross-check of Q/DQ against the engine")
    layers = src.layers.layers if src.layers else ()
    attention = attention_status(layers, scan) if layers else []
    cc = cross_check(layers, scan) if (layers and scan) else []
    if scan is not None and not scan.quantized:
        eight = _get(src.metadata, "precision.qdq_types") or (
            [_get(src.metadata, "precision.requested")] if _get(src.metadata, "precision.requested") in EIGHT_BIT else [])
        notes.append(f"{scan.path.name} has no Q/DQ" + (
            f" (it is the ONNX the build started from; the {'/'.join(eight)} Q/DQ came from the build's own pass)"
            f": nothing to cross-check; pass --onnx with the quantized ONNX, or rebuild with this trtkit, which "
            f"keeps it as {plan.with_suffix('.qdq.onnx').name}" if eight else ": nothing to cross-check"))
    return EngineReport(src=src, onnx=scan, attention=attention, crosscheck=cc, notes=notes)


@dataclass
class Comparison:
    a: EngineReport
    b: EngineReport
    rows: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"kind": "compare", "a": self.a.to_json()["summary"], "b": self.b.to_json()["summary"],
                "plans": [str(self.a.src.plan), str(self.b.src.plan)], "rows": self.rows,
                "notes": {"a": self.a.src.notes + self.a.notes, "b": self.b.src.notes + self.b.notes}}


_COMPUTE_OP = re.compile(r"/(Conv|MatMul|Gemm|Softmax|ConvTranspose)(_\d+)?$")


def compare(a: EngineReport, b: EngineReport) -> Comparison:
    """Layer by layer, matched by the ONNX compute nodes (Conv/MatMul/Gemm/Softmax) each layer carries."""
    ia, ib = _node_index(a.layers), _node_index(b.layers)
    nodes = [n for n in dict.fromkeys([*ia, *ib]) if _COMPUTE_OP.search(n)]
    rows = []
    for n in nodes:
        la = next(iter(ia.get(n, [])), None)
        lb = next(iter(ib.get(n, [])), None)
        rows.append({
            "node": n, "block": node_block(n),
            "a_precision": la.precision if la else None, "b_precision": lb.precision if lb else None,
            "a_layer": la.name if la else None, "b_layer": lb.name if lb else None,
            "a_type": la.type if la else None, "b_type": lb.type if lb else None,
            "same": (la.precision if la else None) == (lb.precision if lb else None),
        })
    return Comparison(a, b, rows)


Report = OnnxReport | EngineReport | Comparison


def _is_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


def inspect(path: str | Path, path2: str | Path | None = None, *, onnx: str | Path | None = None,
            backend: str | None = None, profile_layers: bool = False, from_files: bool = False) -> Report:
    """The `trtkit inspect` verb: dispatch on the file(s)."""
    p = Path(path)
    if not p.exists():
        raise TrtkitError(f"{p} does not exist")
    if p.is_dir():
        raise TrtkitError(f"{p} is a folder; pass an engine plan or an .onnx model")
    if path2 is not None:
        p2 = Path(path2)
        if _is_onnx(p) or _is_onnx(p2):
            raise TrtkitError("comparing takes two engine plans; inspect an .onnx model on its own")
        return compare(engine_report(p, onnx, backend, profile_layers, from_files),
                       engine_report(p2, onnx, backend, profile_layers, from_files))
    if _is_onnx(p):
        if profile_layers:
            raise TrtkitError("--profile-layers times an engine's layers; pass a plan, not an .onnx model")
        return onnx_report(p)
    return engine_report(p, onnx, backend, profile_layers, from_files)


__all__ = ["inspect", "engine_report", "compare", "EngineReport", "Comparison", "OnnxReport", "EIGHT_BIT"]
