"""Where ModelOpt's FP8 graph drifts from FP32, layer by layer, next to trtkit's (onnxruntime).

Takes the cross-check's ONNX files (benchmarks/crosscheck_modelopt.py --case tiny writes them) and
runs the FP32, trtkit FP8 and ModelOpt FP8 graphs on one input with every Conv/MatMul/Gemm output (by
node name: both exports keep the diffusers module scopes) as an extra graph output. Per layer, in graph
order, it prints each quantized graph's error against FP32 there (max |x - ref| / max |ref|): where
ModelOpt's column leaves trtkit's is where its quantization costs the accuracy. onnxruntime's graph
optimizations are off for that (they would rename or fuse the tensors compared); the script then prints
both graphs' output error at each optimization level, and at the basic level without onnxruntime's
`QDQPropagationTransformer` (docs/quantization.md, "FP8 on the tiny UNet: the bisection").

    python3 benchmarks/crosscheck_fp8_layers.py /tmp/xcheck/tiny [--json out.json] [--dq-without-zero-point]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx

from trtkit.graph.modelopt_form import to_native

OPS = ("Conv", "MatMul", "Gemm", "Softmax", "LayerNormalization", "InstanceNormalization")


def layer_outputs(m: onnx.ModelProto) -> dict[str, str]:
    """{node name: its first output} of the ops compared, for nodes inside the UNet scope."""
    return {n.name: n.output[0] for n in m.graph.node if n.op_type in OPS and n.name.startswith("/unet/")}


def run(m: onnx.ModelProto, names: dict[str, str], feeds: dict[str, np.ndarray], half: bool) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    m = onnx.ModelProto.FromString(m.SerializeToString())
    have = {o.name for o in m.graph.output}
    for t in names.values():
        if t not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every named tensor
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    f = {k: (v.astype(np.float16) if half else v) for k, v in feeds.items()}
    outs = sess.run(None, f)
    by = dict(zip([o.name for o in sess.get_outputs()], outs, strict=True))
    res = {k: by[t].astype(np.float32) for k, t in names.items()}
    res["output"] = outs[0].astype(np.float32)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--dq-without-zero-point", action="store_true",
                    help="drop the FP8 zero point to_native gives ModelOpt's DQ nodes (how it was before the fix)")
    args = ap.parse_args()
    d = args.dir
    m32 = onnx.load(str(d / "unet.fp32.onnx"))
    tk = onnx.load(str(d / "trtkit.fp8.onnx"))
    mo = onnx.load(str(d / "modelopt.fp8.onnx"))
    to_native(mo)
    if args.dq_without_zero_point:
        for n in mo.graph.node:
            if n.op_type == "DequantizeLinear" and len(n.input) == 3 and n.input[2] == "trtkit_fp8_zero_point":
                del n.input[2]
    n32, ntk, nmo = layer_outputs(m32), layer_outputs(tk), layer_outputs(mo)
    common = [k for k in n32 if k in ntk and k in nmo]
    print(f"layers: fp32 {len(n32)}, trtkit {len(ntk)}, ModelOpt {len(nmo)}, in all three {len(common)}")
    shapes = {i.name: [x.dim_value for x in i.type.tensor_type.shape.dim] for i in m32.graph.input}
    rng = np.random.default_rng(1)  # the bypass script's evaluation input
    feeds = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
    feeds["timestep"] = np.array([500.0], np.float32)
    if "time_ids" in feeds:
        feeds["time_ids"] = np.tile(np.array([256, 256, 0, 0, 256, 256], np.float32), (shapes["time_ids"][0], 1))
    sel = {k: n32[k] for k in common}
    r32 = run(m32, sel, feeds, half=False)
    rtk = run(tk, {k: ntk[k] for k in common}, feeds, half=True)
    rmo = run(mo, {k: nmo[k] for k in common}, feeds, half=True)

    def e(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))

    rows = [{"layer": k, "op": k.rsplit("/", 1)[-1], "trtkit": e(rtk[k], r32[k]), "modelopt": e(rmo[k], r32[k])}
            for k in [*common, "output"]]
    print("| layer | error vs FP32: trtkit | ModelOpt | ModelOpt/trtkit |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['trtkit']:.4f} | {r['modelopt']:.4f} | {r['modelopt'] / max(r['trtkit'], 1e-9):.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    import onnxruntime as ort

    L = ort.GraphOptimizationLevel
    half = {k: v.astype(np.float16) for k, v in feeds.items()}
    print("\n| onnxruntime optimizations | trtkit | ModelOpt |\n|---|---|---|")
    for tag, lvl, off in (("off", L.ORT_DISABLE_ALL, []), ("basic", L.ORT_ENABLE_BASIC, []),
                          ("extended", L.ORT_ENABLE_EXTENDED, []), ("all (default)", L.ORT_ENABLE_ALL, []),
                          ("basic without QDQPropagationTransformer", L.ORT_ENABLE_BASIC,
                           ["QDQPropagationTransformer"])):
        errs = []
        for m in (tk, mo):
            so = ort.SessionOptions()
            so.graph_optimization_level = lvl
            sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                        disabled_optimizers=off)
            errs.append(e(sess.run(None, half)[0].astype(np.float32), r32["output"]))
        print(f"| {tag} | {errs[0]:.4f} | {errs[1]:.4f} |", flush=True)


if __name__ == "__main__":
    main()
