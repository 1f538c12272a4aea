"""Layer by layer: torch fake quantization against the Q/DQ ONNX on the *same* inputs (issue 18, "fake and
real quantization agree").

The whole-loop check (qdq_crosscheck.py) compares error sizes, because float noise decorrelates the two
runs' rounding along the UNet. This one removes the chain: one onnxruntime call (graph optimisations off)
returns, for every quantized op, the tensor entering its QuantizeLinear (pre-Q), the DequantizeLinear
output the op reads, the dequantized weight and the op's output; torch then redoes each step from the
ONNX tensors with fakequant's functions and the calibration file:

* quantizer: fakequant.fake_quant(pre-Q, the file's amax) against the DQ output (fraction of elements
  that differ: 0, or a few float-tie flips);
* weight: fakequant.fake_quant_weight(W * s) against the DequantizeLinear of the 8-bit initializer;
* smoothing: the pre-Q tensor against (the op's FP32 input) / s, the input taken from the same run (the
  tensor before the inserted Mul, or recomputed from the folded LayerNorm's input);
* op: the torch op on the DQ output with the fake-quant weight against the ONNX op's output;
* attention: the same quantizer check on Q, K, V (amax times the SDPA pre-scale) and the softmax (amax 1).

And the drift: each quantized module's FP32 input in the fake-quant torch run against the same tensor of
the ONNX run (relative difference), in the graph's order, so the growth of the decorrelation is visible.

    python3 benchmarks/shapes/qdq_layers.py --calib-dir /tmp/trtkit-shapes --modes "INT8 mean + SQ;FP8 max"
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks.shapes` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from benchmarks.shapes import model as M
from benchmarks.shapes import render
from benchmarks.shapes.bench import load
from trtkit.calibration import fakequant


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _diff_frac(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """Fraction of elements rounded to another level (a float32 ulp of the scale is no difference)."""
    tol = 1e-4 * torch.maximum(b.abs(), torch.tensor(scale))
    return float(((a - b).abs() > tol).float().mean())


def layer_report(unet: Any, onnx_path: Path, q_path: Path, cal: Any, feeds: dict[str, np.ndarray],
                 x_in: torch.Tensor, t: int, enc: torch.Tensor) -> dict[str, Any]:
    import onnx
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    from trtkit.graph import patterns
    from trtkit.graph.onnx_io import float_values
    from trtkit.graph.scales import prescale_factor

    orig = gs.import_onnx(onnx.load(str(onnx_path)))
    omatch = patterns.find(orig, patterns.scope_of({p.key: p.value for p in onnx.load(str(onnx_path),
                                                    load_external_data=False).metadata_props}))
    onodes = {n.name: n for n in orig.nodes}
    order = {n.name: i for i, n in enumerate(orig.toposort().nodes)}
    qmodel = onnx.load(str(q_path))
    g = gs.import_onnx(qmodel)
    nodes = {n.name: n for n in g.nodes}
    targets = fakequant.targets_of(cal, unet)
    modules = dict(unet.named_modules())
    prec = cal.precision
    want: dict[str, gs.Variable] = {}
    plan: dict[str, dict[str, Any]] = {}

    def expose(t_: gs.Tensor) -> str:
        want[t_.name] = t_
        return t_.name

    def qdq_of(a: gs.Tensor) -> tuple[gs.Node, gs.Node] | None:
        dq = patterns.producer(a)
        if dq is None or dq.op != "DequantizeLinear":
            return None
        q = patterns.producer(dq.inputs[0])
        return (q, dq) if q is not None and q.op == "QuantizeLinear" else None

    for m in (*omatch.linear, *omatch.conv):
        if targets.get(m.module) not in ("linear", "conv"):
            continue
        node = nodes[m.node]
        pair = qdq_of(node.inputs[0])
        entry: dict[str, Any] = {"kind": m.kind, "op": node.op, "qdq": pair is not None, "order": order[m.node]}
        if pair is not None:
            q, _dq = pair
            entry["pre"] = expose(q.inputs[0])
            entry["act"] = expose(node.inputs[0])
            entry["scale"] = float(np.asarray(q.inputs[1].values))
            pre_p = patterns.producer(q.inputs[0])
            if pre_p is not None and pre_p.op == "Mul" and "/smooth/Mul" in pre_p.name:  # rewrite.Inserter.mul
                entry["fp32_in"], entry["smooth_via"] = expose(pre_p.inputs[0]), "Mul"
            elif m.module in cal.smooth:  # folded into the LayerNorm producing the pre-Q tensor
                assert pre_p is not None and pre_p.op == "LayerNormalization", (m.module, pre_p)
                ln, oln = pre_p, onodes[pre_p.name]
                entry["ln_in"], entry["smooth_via"] = expose(ln.inputs[0]), "LayerNorm"
                entry["ln"] = (float_values(oln.inputs[1], onnx_path.parent),
                               float_values(oln.inputs[2], onnx_path.parent), float(ln.attrs.get("epsilon", 1e-5)))
            else:
                entry["fp32_in"] = entry["pre"]
        wdq = patterns.producer(node.inputs[1])
        assert wdq is not None and wdq.op == "DequantizeLinear", (m.module, wdq)
        entry["w_dq"] = expose(wdq.outputs[0])
        entry["out"] = expose(node.outputs[0])
        plan[m.module] = entry
    for a in omatch.attention:
        if targets.get(a.module) != "attention":
            continue
        b1, b2 = nodes[a.bmm1], nodes[a.bmm2]
        entry = {"kind": "attention"}
        for role, (nd, idx) in {"q_bmm": (b1, 0), "k_bmm": (b1, 1), "v_bmm": (b2, 1), "softmax": (b2, 0)}.items():
            pair = qdq_of(nd.inputs[idx])
            if pair is None:
                entry[role] = None
                continue
            entry[role] = {"pre": expose(pair[0].inputs[0]), "act": expose(nd.inputs[idx]),
                           "scale": float(np.asarray(pair[0].inputs[1].values)),
                           "prescale": prescale_factor(onodes, a, role)}
        plan[a.module] = entry

    g.outputs = [*g.outputs, *want.values()]
    for v in want.values():
        if v.dtype is None:
            v.dtype = np.float32
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryDirectory(prefix="qdq-layers-") as tmp:
        p = Path(tmp) / "exposed.onnx"
        onnx.save(gs.export_onnx(g), str(p))
        sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        vals = dict(zip(names, sess.run(None, feeds), strict=True))
    T = {k: torch.from_numpy(np.array(v)) for k, v in vals.items() if k in want}

    # the drift: FP32 inputs of the quantized modules in the fake-quant torch run (before smoothing)
    # and in the FP32 run: the size of the quantization error the drift is compared with
    seen: dict[str, torch.Tensor] = {}
    seen32: dict[str, torch.Tensor] = {}
    into = seen32
    handles = [modules[k].register_forward_pre_hook(lambda _m, args, _k=k: into.__setitem__(_k, args[0].detach()))
               for k, e in plan.items() if e["kind"] != "attention"]
    try:
        with torch.no_grad():
            unet(x_in, t, encoder_hidden_states=enc)
            into = seen
            with fakequant.quantized(unet, cal):
                unet(x_in, t, encoder_hidden_states=enc)
    finally:
        for h in handles:
            h.remove()

    rows: dict[str, Any] = {}
    for name, e in plan.items():
        r: dict[str, Any] = {"kind": e["kind"], "order": e.get("order", -1)}
        if e["kind"] == "attention":
            for role in ("q_bmm", "k_bmm", "v_bmm", "softmax"):
                er = e[role]
                if er is None:
                    r[role] = "no Q/DQ"
                    continue
                amax = 1.0 if role == "softmax" else cal.activations[f"{name}.{role}"] * er["prescale"]
                want_q = fakequant.fake_quant(T[er["pre"]], amax, prec)
                r[role] = {"differ": _diff_frac(want_q, T[er["act"]], er["scale"]),
                           "scale_vs_amax": er["scale"] / (amax / fakequant.QMAX[prec])}
            rows[name] = r
            continue
        mod = modules[name]
        s = torch.as_tensor(cal.smooth[name], dtype=torch.float32) if name in cal.smooth else None
        w = mod.weight.detach().float()
        w_fq = fakequant.fake_quant_weight(w * s if s is not None else w, prec)
        w_onnx = T[e["w_dq"]]
        if e["op"] in ("MatMul",) or (e["op"] == "Gemm" and tuple(w_onnx.shape) != tuple(w_fq.shape)):
            w_onnx = w_onnx.T
        r["weight_rel"] = _rel(w_onnx, w_fq)
        if e["qdq"]:
            amax = cal.activations[name]
            pre, act = T[e["pre"]], T[e["act"]]
            r["quantizer_differ"] = _diff_frac(fakequant.fake_quant(pre, amax, prec), act, e["scale"])
            r["scale_vs_amax"] = e["scale"] / (amax / fakequant.QMAX[prec])
            if "ln_in" in e:
                gamma, beta, eps = e["ln"]
                x32 = torch.nn.functional.layer_norm(T[e["ln_in"]], (gamma.shape[-1],), torch.from_numpy(gamma),
                                                     torch.from_numpy(beta), eps)
            else:
                x32 = T[e["fp32_in"]]
            r["smoothing"] = e.get("smooth_via", "none")
            r["smooth_rel"] = _rel(pre, x32 / s if s is not None else x32)
            if name in seen and seen[name].shape == x32.shape:
                r["drift_rel"] = _rel(seen[name], x32)
                r["quant_rel"] = _rel(seen[name], seen32[name])
            with torch.no_grad():
                if isinstance(mod, torch.nn.Conv2d):
                    y = torch.nn.functional.conv2d(act, w_fq, mod.bias, mod.stride, mod.padding, mod.dilation,
                                                   mod.groups)
                else:
                    y = torch.nn.functional.linear(act, w_fq, mod.bias if e["op"] == "Gemm" else None)
            r["op_rel"] = _rel(T[e["out"]], y)
        rows[name] = r
    return rows


def summarize(rows: dict[str, Any]) -> dict[str, Any]:
    lin = sorted((r for r in rows.values() if r["kind"] != "attention"), key=lambda r: r["order"])
    att = [r[role] for r in rows.values() if r["kind"] == "attention" for role in ("q_bmm", "k_bmm", "v_bmm",
                                                                                      "softmax")
           if isinstance(r[role], dict)]

    def mx(key: str, rs: list[dict[str, Any]]) -> float | None:
        v = [r[key] for r in rs if key in r]
        return max(v) if v else None

    return {"layers": len(lin), "attention_inputs": len(att),
            "max_quantizer_differ": mx("quantizer_differ", lin), "max_weight_rel": mx("weight_rel", lin),
            "max_smooth_rel": mx("smooth_rel", lin), "max_op_rel": mx("op_rel", lin),
            "max_attention_quantizer_differ": mx("differ", att),
            "scale_vs_amax_range": [min([r["scale_vs_amax"] for r in lin + att if "scale_vs_amax" in r] or [1]),
                                    max([r["scale_vs_amax"] for r in lin + att if "scale_vs_amax" in r] or [1])],
            "drift_rel_first_last_max": (lambda d: [d[0], d[-1], max(d)] if d else None)(
                [r["drift_rel"] for r in lin if "drift_rel" in r]),
            "quant_rel_first_last_max": (lambda d: [d[0], d[-1], max(d)] if d else None)(
                [r["quant_rel"] for r in lin if "quant_rel" in r])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=Path(__file__).resolve().parent / "weights")
    ap.add_argument("--untrained", action="store_true")
    ap.add_argument("--calib-dir", type=Path, default=Path("/tmp/trtkit-shapes"), help="bench.py's --out")
    ap.add_argument("--modes", default="INT8 mean;INT8 mean + SQ;FP8 max")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--timestep", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="JSON: per mode a summary and the per-layer rows")
    args = ap.parse_args()
    args.device = "cpu"
    from benchmarks.shapes.qdq_crosscheck import export, quantized_modes

    unet, text_encoder, _, source = load(args)
    ev = render.sample_scenes(args.images, np.random.default_rng(args.seed + 30_000))
    caps, seeds = [render.caption(s) for s in ev], np.arange(args.images) + 3_000_000
    x_in = torch.cat([M.seeded_noise(seeds)] * 2)
    with torch.no_grad():
        enc = torch.cat([M.encode(text_encoder, [""] * len(caps)), M.encode(text_encoder, caps)])
    feeds = {"sample": x_in.numpy(), "timestep": np.array([float(args.timestep)], np.float32),
             "encoder_hidden_states": enc.numpy()}
    out: dict[str, Any] = {"weights": source, "images": args.images, "timestep": args.timestep, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="shapes-layers-") as tmp:
        onnx_path = export(unet, Path(tmp), args.images)
        for name, _, cal, q in quantized_modes(onnx_path, Path(tmp), args.calib_dir, args.modes):
            rows = layer_report(unet, onnx_path, q.path, cal, feeds, x_in, args.timestep, enc)
            out["modes"][name] = {"summary": summarize(rows), "layers": rows}
            print(name, json.dumps(out["modes"][name]["summary"]), flush=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
