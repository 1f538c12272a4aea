"""Cross-check of trtkit's quantization against NVIDIA ModelOpt's diffusers recipe, layer by layer.

Both sides see the SAME calibration data (the UNet inputs recorded once from the pipeline: the tiny
SDXL pipeline on the built-in prompts, or the digits denoiser's guided DDIM loop) and the SAME
reduction (plain max over every pass and step: trtkit `--reduction max --percentile 1.0`, ModelOpt's
max calibrator). Per case and precision it writes a JSON and prints a Markdown table:

* which modules each side quantizes, and why they differ;
* per layer, ModelOpt's activation amax over trtkit's, and the ratio of the activation Q/DQ scales
  that each side's ONNX actually carries (where the placement, not the range, differs);
* onnxruntime output error against the FP32 ONNX (max |out - ref| / max |ref|) for both ONNX files,
  on inputs neither calibrated on.

Needs `pip install 'trtkit[modelopt]'` (CPU is enough):

    python3 benchmarks/crosscheck_modelopt.py --case tiny --out /tmp/xcheck
    python3 benchmarks/crosscheck_modelopt.py --case digits --out /tmp/xcheck
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
Batch = dict[str, Any]  # UNet keyword inputs of one call


# --------------------------------------------------------------------------- the calibration data

def record_tiny(work: Path, prompts: int, steps: int) -> tuple[Any, list[Batch], dict[str, tuple[int, ...]]]:
    from diffusers import StableDiffusionXLPipeline

    from trtkit.tiny import make_tiny_pipeline

    model_dir = work / "tiny-pipeline"
    if not (model_dir / "model_index.json").is_file():
        make_tiny_pipeline(model_dir, seed=0)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir))
    lines = [ln.strip() for ln in (Path(sys.modules["trtkit"].__file__).parent / "calibration/prompts.txt")
             .read_text().splitlines() if ln.strip() and not ln.startswith("#")][:prompts]
    calls: list[Batch] = []
    unet = pipe.unet.eval()
    orig = unet.forward

    def rec(sample, timestep, encoder_hidden_states, **kw):  # type: ignore[no-untyped-def]
        calls.append({"sample": sample.clone(), "timestep": torch.as_tensor(timestep).reshape(1).float().clone(),
                      "encoder_hidden_states": encoder_hidden_states.clone(),
                      "text_embeds": kw["added_cond_kwargs"]["text_embeds"].clone(),
                      "time_ids": kw["added_cond_kwargs"]["time_ids"].float().clone()})
        return orig(sample, timestep, encoder_hidden_states, **kw)

    unet.forward = rec  # type: ignore[method-assign]
    with torch.no_grad():
        for i in range(0, len(lines), 2):
            pipe(lines[i:i + 2], num_inference_steps=steps, height=256, width=256, output_type="latent",
                 generator=torch.Generator().manual_seed(i))
    unet.forward = orig  # type: ignore[method-assign]
    b = calls[0]
    return unet, calls, {k: tuple(v.shape) for k, v in b.items()}


def record_digits(prompts: int, steps: int) -> tuple[Any, list[Batch], dict[str, tuple[int, ...]]]:
    sys.path.insert(0, str(HERE / "digits"))
    from model import SIZE, load_model, make_scheduler  # type: ignore[import-not-found]

    unet, emb = load_model()
    g = torch.Generator().manual_seed(10_000)
    calls: list[Batch] = []
    with torch.no_grad():
        for _ in range(prompts // 2):
            labels = torch.randint(0, 10, (2,), generator=g)
            x = torch.randn(2, 1, SIZE, SIZE, generator=g)
            enc = torch.cat([emb(torch.full_like(labels, 10)), emb(labels)])[:, None, :]
            sched = make_scheduler()
            sched.set_timesteps(steps)
            for t in sched.timesteps:
                b = {"sample": torch.cat([x, x]), "timestep": torch.as_tensor(t).reshape(1).float(),
                     "encoder_hidden_states": enc}
                calls.append(b)
                e_u, e_c = unet(b["sample"], t, encoder_hidden_states=enc).sample.chunk(2)
                x = sched.step(e_u + 1.5 * (e_c - e_u), t, x).prev_sample
    return unet, calls, {k: tuple(v.shape) for k, v in calls[0].items()}


def call(unet, b: Batch):  # type: ignore[no-untyped-def]
    added = {"text_embeds": b["text_embeds"], "time_ids": b["time_ids"]} if "text_embeds" in b else None
    return unet(b["sample"], b["timestep"], encoder_hidden_states=b["encoder_hidden_states"],
                added_cond_kwargs=added).sample


# --------------------------------------------------------------------------- the two recipes

def trtkit_calibration(unet, calls: list[Batch], precision: str, level: float, steps: int):  # type: ignore[no-untyped-def]
    from trtkit.calibration import levels
    from trtkit.calibration.calibrate import Recipe, build_calibration
    from trtkit.calibration.hooks import tapped
    from trtkit.calibration.stats import StepStats

    targets = levels.targets(unet, level)
    stats = StepStats(steps)
    with torch.no_grad(), tapped(unet, targets, stats.observe):
        for i, b in enumerate(calls):
            if i % steps == 0:
                stats.begin_pass()
            stats.step = i % steps
            call(unet, b)
    recipe = Recipe(precision=precision, level=level, percentile=1.0, reduction="max", smoothquant=False)
    return build_calibration(stats, unet, recipe, run={"benchmark": "crosscheck_modelopt"})


def modelopt_quantized(unet, calls: list[Batch], precision: str, level: float):  # type: ignore[no-untyped-def]
    from trtkit.calibration.modelopt_flow import quantize_unet

    mo = copy.deepcopy(unet)

    def loop(m) -> None:  # type: ignore[no-untyped-def]
        for b in calls:
            call(m, b)

    with torch.no_grad():
        quantize_unet(mo, precision, level, loop)
    return mo


def modelopt_ranges(mo) -> tuple[dict[str, float], list[str]]:  # type: ignore[no-untyped-def]
    """Enabled activation ranges as trtkit keys, and the enabled LayerNorm input quantizers."""
    import modelopt.torch.opt as mto

    from trtkit.calibration import modelopt_state

    st = modelopt_state.parse({"model_state_dict": mo.state_dict(), "modelopt_state": mto.modelopt_state(mo)})
    cal = modelopt_state.to_calibration(st)
    norms = [m for m in (n.rpartition(".")[0] for n, q in st.quantizers.items()
                         if n.endswith(".input_quantizer") and q.enabled and q.amax is not None)
             if f"{m}.weight_quantizer" not in st.quantizers]
    return cal.activations, norms


# --------------------------------------------------------------------------- ONNX side

def act_scales(path: Path) -> dict[str, float]:
    """{trtkit key: activation Q/DQ scale} read from an ONNX graph (linear/conv inputs, attention q/k/v)."""
    import onnx_graphsurgeon as gs

    from trtkit._files import load_onnx
    from trtkit.graph import patterns

    model = load_onnx(path)
    with patterns.quiet_gs():
        graph = gs.import_onnx(model)
    m = patterns.find(graph, "/unet/")
    tensors = graph.tensors()

    def scale(name: str) -> float | None:
        t = tensors.get(name)
        p = patterns.producer(t) if t is not None else None
        if p is not None and p.op == "Cast":
            p = patterns.producer(p.inputs[0])
        if p is None or "DequantizeLinear" not in p.op:
            return None
        s = p.inputs[1]
        if not isinstance(s, gs.Constant):
            q = patterns.producer(s)
            s = q.attrs.get("value") if q is not None and q.op == "Constant" else None
        return float(np.asarray(s.values).reshape(-1)[0]) if isinstance(s, gs.Constant) else None

    out: dict[str, float] = {}
    for w in (*m.linear, *m.conv):
        if w.input_type:
            v = scale(w.input)
            if v:
                out[w.module] = v
    for a in m.attention:
        for role, bmm, idx in (("q_bmm", a.bmm1, 0), ("k_bmm", a.bmm1, 1), ("v_bmm", a.bmm2, 1)):
            node = next(n for n in graph.nodes if n.name == bmm)
            v = scale(node.inputs[idx].name)
            if v:
                out[f"{a.module}.{role}"] = v
    return out


def ort_error(path: Path, feeds: dict[str, np.ndarray], ref: np.ndarray, half: bool = False) -> float:
    import onnx

    from trtkit.exporter import run_onnxruntime
    from trtkit.graph.modelopt_form import to_native

    m = onnx.load(str(path))
    if to_native(m):
        path = path.with_name(path.stem + ".native.onnx")
        onnx.save(m, str(path))
    f = {k: v.astype(np.float16) for k, v in feeds.items()} if half else feeds
    out = run_onnxruntime(path, f)[0].astype(np.float32)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


# --------------------------------------------------------------------------- the table

def why(key: str, kind: str, tk: bool, mo: bool) -> str:
    from trtkit.calibration.levels import EXCLUDED
    from trtkit.calibration.modelopt_flow import MODELOPT_EXCLUDED

    if tk == mo:
        return ""
    only_tk = [p for p in MODELOPT_EXCLUDED if p in key and p not in EXCLUDED]
    only_mo = [p for p in EXCLUDED if p in key and p not in MODELOPT_EXCLUDED]
    if mo and only_mo:
        return f"`{only_mo[0]}`: in demoDiffusion's exclusion list (trtkit), not in ModelOpt's filter_func"
    if tk and only_tk:
        return f"`{only_tk[0]}`: in ModelOpt's filter_func only"
    return "ModelOpt only" if mo else "trtkit only"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=("tiny", "digits"), default="tiny")
    ap.add_argument("--prompts", type=int, default=4, help="calibration prompts (2 per pipeline call)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("/tmp/trtkit-xcheck"))
    args = ap.parse_args()
    torch.manual_seed(0)
    work = args.out / args.case
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.case == "tiny":
        unet, calls, shapes = record_tiny(args.out, args.prompts, args.steps)
    else:
        unet, calls, shapes = record_digits(args.prompts, args.steps)
    print(f"{args.case}: {len(calls)} recorded UNet calls ({args.prompts} prompts x {args.steps} steps), "
          f"{time.time() - t0:.0f} s", flush=True)

    from trtkit.calibfile import save
    from trtkit.calibration.modelopt_flow import export_onnx
    from trtkit.graph.qdq import QuantizeConfig, quantize

    fp32 = export_onnx(unet, shapes, work / "unet.fp32.onnx", "none")
    rng = np.random.default_rng(1)  # evaluation inputs: a recorded call's conditioning, fresh latent
    last = calls[-1]
    feeds = {k: v.numpy().astype(np.float32) for k, v in last.items()}
    feeds["sample"] = rng.standard_normal(feeds["sample"].shape).astype(np.float32)
    from trtkit.exporter import run_onnxruntime

    ref = run_onnxruntime(fp32, feeds)[0]
    report: dict[str, Any] = {"case": args.case, "calls": len(calls), "prompts": args.prompts, "steps": args.steps}
    for precision, level in (("int8", 3.0), ("fp8", 4.0)):
        t1 = time.time()
        cal = trtkit_calibration(unet, calls, precision, level, args.steps)
        calib = save(cal, work / f"calib.{precision}.json")
        half = precision == "fp8"  # ModelOpt's FP8 attention export needs an FP16 model
        tk_onnx = work / f"trtkit.{precision}.onnx"
        r = quantize(QuantizeConfig(onnx_path=fp32, output=tk_onnx, precision=precision, level=level, calib=calib,
                                    fp16=half, io_dtype="float16" if half else "float32"))
        tk_q = {d.module: d.kind for d in r.decisions if d.quantized}
        mo = modelopt_quantized(unet, calls, precision, level)
        mo_ranges, norms = modelopt_ranges(mo)
        mo_onnx = export_onnx(mo, shapes, work / f"modelopt.{precision}.onnx", precision, half=half)
        del mo
        tk_s, mo_s = act_scales(tk_onnx), act_scales(mo_onnx)
        kinds = {d.module: d.kind for d in r.decisions}
        rows = []
        for key in sorted(set(kinds) | {k.rpartition(".")[0] for k in mo_ranges if k.endswith("_bmm")}
                          | {k for k in mo_ranges if not k.endswith(("_bmm", "softmax"))}):
            kind = kinds.get(key, "linear")
            keys = [f"{key}.q_bmm", f"{key}.k_bmm", f"{key}.v_bmm"] if kind == "attention" else [key]
            for k in keys:
                tk_on, mo_on = key in tk_q, k in mo_ranges
                ta, ma = cal.activations.get(k), mo_ranges.get(k)
                rows.append({"key": k, "kind": kind, "trtkit": tk_on, "modelopt": mo_on,
                             "amax_trtkit": ta if tk_on else None, "amax_modelopt": ma,
                             "amax_ratio": (ma / ta) if (ta and ma and tk_on) else None,
                             "scale_ratio": (mo_s[k] / tk_s[k]) if (k in mo_s and k in tk_s) else None,
                             "why": why(key, kind, tk_on, mo_on)})
        e_tk = ort_error(tk_onnx, feeds, ref, half=half)
        e_mo = ort_error(mo_onnx, feeds, ref, half=half)
        ratios = [x["amax_ratio"] for x in rows if x["amax_ratio"]]
        sratios = [x["scale_ratio"] for x in rows if x["scale_ratio"]]
        summ = {"trtkit_quantized": sum(x["trtkit"] for x in rows), "modelopt_quantized": sum(x["modelopt"] for x in rows),
                "both": sum(x["trtkit"] and x["modelopt"] for x in rows),
                "modelopt_layernorm_inputs": len(norms), "amax_ratio_min": min(ratios), "amax_ratio_max": max(ratios),
                "scale_ratio_min": min(sratios) if sratios else None, "scale_ratio_max": max(sratios) if sratios else None,
                "ort_error_trtkit": e_tk, "ort_error_modelopt": e_mo, "seconds": time.time() - t1}
        report[precision] = {"summary": summ, "rows": rows, "layernorm_inputs": norms}
        print(f"\n### {args.case}, {precision.upper()} level {level:g}\n\n{json.dumps(summ)}\n")
        print("| layer | kind | trtkit | ModelOpt | amax ModelOpt/trtkit | ONNX scale ModelOpt/trtkit | why they differ |")
        print("|---|---|---|---|---|---|---|")
        for x in rows:
            if x["why"] or (x["amax_ratio"] and abs(x["amax_ratio"] - 1) > 1e-3) or (
                    x["scale_ratio"] and abs(x["scale_ratio"] - 1) > 2e-3):
                f = (lambda v: f"{v:.4f}" if v else "-")  # noqa: E731
                print(f"| {x['key']} | {x['kind']} | {'yes' if x['trtkit'] else 'no'} | "
                      f"{'yes' if x['modelopt'] else 'no'} | {f(x['amax_ratio'])} | {f(x['scale_ratio'])} | {x['why']} |")
    (work / "crosscheck.json").write_text(json.dumps(report, indent=1))
    print(f"\nwrote {work / 'crosscheck.json'} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
