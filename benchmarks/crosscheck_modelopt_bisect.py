"""Bisect ModelOpt's FP8 error on one UNet: which of its quantizers cost the accuracy, in torch.

The cross-check (benchmarks/crosscheck_modelopt.py) found ModelOpt's FP8 level-4 tiny SDXL UNet 4x
further from FP32 than trtkit's (onnxruntime), with equal ranges on every shared layer. This script
runs ModelOpt's recipe once (the same recorded calibration calls, `modelopt_flow.quantize_unet`) and
then switches its calibrated quantizers on and off by group, and one by one, on the torch model
(ModelOpt's own fake quantization), measuring max |out - ref| / max |ref| against the FP32 UNet on
the cross-check's evaluation input (a recorded call's conditioning, a fresh latent). Groups:

* `weight`: every weight quantizer (FP8 per tensor in ModelOpt's preset);
* `conv_in` / `linear_in`: the input quantizers of Conv2d / Linear layers trtkit also quantizes;
* `proj_out_in`: the `proj_out` Linear inputs (demoDiffusion excludes them, ModelOpt's filter not);
* `norm_in`: LayerNorm input quantizers (ModelOpt's `*input_quantizer` pattern matches them);
* `bmm`: the attention q/k/v BMM quantizers.

`--per-layer` also ranks every activation quantizer by the error it adds alone on top of the weights.
The last rows recalibrate ModelOpt's weight quantizers per output channel (axis 0), as trtkit
quantizes weights.

    python3 benchmarks/crosscheck_modelopt_bisect.py --case tiny --out /tmp/xcheck --per-layer
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import crosscheck_modelopt as xc  # noqa: E402

GROUPS = ("weight", "conv_in", "linear_in", "proj_out_in", "norm_in", "bmm")


def group_of(name: str, module: Any) -> str:
    """Which group the quantizer `name` (a TensorQuantizer's module path) belongs to."""
    owner, _, leaf = name.rpartition(".")
    if leaf == "weight_quantizer":
        return "weight"
    if leaf.endswith("_bmm_quantizer") or leaf == "softmax_quantizer":
        return "bmm"
    if isinstance(module, torch.nn.Conv2d):
        return "conv_in"
    if isinstance(module, torch.nn.Linear):
        return "proj_out_in" if owner.endswith("proj_out") else "linear_in"
    if isinstance(module, torch.nn.LayerNorm):
        return "norm_in"
    return "other"


def enabled_quantizers(mo: Any) -> dict[str, tuple[Any, str]]:
    """{quantizer path: (quantizer, group)} of every quantizer the recipe left enabled."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    mods = dict(mo.named_modules())
    return {n: (q, group_of(n, mods[n.rpartition(".")[0]])) for n, q in mods.items()
            if isinstance(q, TensorQuantizer) and q.is_enabled}


def load_or_record(args: argparse.Namespace) -> tuple[Any, list[xc.Batch], dict[str, tuple[int, ...]]]:
    """The cross-check's recorded calls, cached (recording the tiny pipeline takes minutes here)."""
    cache = args.out / args.case / f"calls.{args.prompts}x{args.steps}.pt"
    if args.case == "tiny":
        if cache.is_file():
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(str(args.out / "tiny-pipeline"), subfolder="unet").eval()
            calls = torch.load(cache)
        else:
            unet, calls, _ = xc.record_tiny(args.out, args.prompts, args.steps)
    else:
        unet, calls, _ = xc.record_digits(args.prompts, args.steps)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(calls, cache)
    return unet, calls, {k: tuple(v.shape) for k, v in calls[0].items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=("tiny", "digits"), default="tiny")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--precision", choices=("fp8", "int8"), default="fp8")
    ap.add_argument("--level", type=float, default=4.0)
    ap.add_argument("--per-layer", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("/tmp/trtkit-xcheck"))
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    unet, calls, _shapes = load_or_record(args)
    rng = np.random.default_rng(1)  # the cross-check's evaluation input
    ev = dict(calls[-1])
    ev["sample"] = torch.from_numpy(rng.standard_normal(tuple(ev["sample"].shape)).astype(np.float32))
    with torch.no_grad():
        ref = xc.call(unet, ev)
    mo = xc.modelopt_quantized(unet, calls, args.precision, args.level)
    qs = enabled_quantizers(mo)

    def err(on: set[str]) -> float:
        for n, (q, _g) in qs.items():
            q.enable() if n in on else q.disable()
        with torch.no_grad():
            out = xc.call(mo, ev)
        return float((out - ref).abs().max() / ref.abs().max())

    by_group = {g: {n for n, (_q, gg) in qs.items() if gg == g} for g in GROUPS}
    every = set(qs)
    counts = {g: len(v) for g, v in by_group.items()}
    rows: list[dict[str, Any]] = []

    def row(tag: str, on: set[str]) -> None:
        rows.append({"enabled": tag, "quantizers": len(on), "error": err(on)})
        print(f"| {tag} | {len(on)} | {rows[-1]['error']:.4f} |", flush=True)

    print(f"{args.case}, {args.precision} level {args.level:g}: quantizers per group {counts}\n")
    print("| quantizers enabled (torch, ModelOpt fake quant) | count | error vs FP32 |\n|---|---|---|")
    row("none", set())
    row("all (ModelOpt's recipe)", every)
    row("weights only", by_group["weight"])
    for g in GROUPS[1:]:
        row(f"weights + {g}", by_group["weight"] | by_group[g])
    for g in GROUPS[1:]:
        row(f"{g} alone", by_group[g])
    for g in GROUPS[1:]:
        row(f"all but {g}", every - by_group[g])
    shared = by_group["weight"] | by_group["conv_in"] | by_group["linear_in"] | by_group["bmm"]
    row("trtkit's set (all but norm_in, proj_out_in)", shared)
    # trtkit quantizes weights per output channel: the same quantizers, amax per row of the weight
    mods = dict(mo.named_modules())
    for n in by_group["weight"]:
        q, w = qs[n][0], mods[n.rpartition(".")[0]].weight.detach()
        del q._amax
        q.axis = 0
        q.amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    row("weights only, per output channel", by_group["weight"])
    row("trtkit's set, weights per output channel", shared)
    row("all, weights per output channel", every)
    report: dict[str, Any] = {"case": args.case, "precision": args.precision, "level": args.level,
                              "counts": counts, "rows": rows}
    if args.per_layer:  # on ModelOpt's own per-tensor weights
        for n in by_group["weight"]:
            q, w = qs[n][0], mods[n.rpartition(".")[0]].weight.detach()
            del q._amax
            q.axis = None
            q.amax = w.abs().amax()
        base = err(by_group["weight"])
        single = []
        for n in sorted(every - by_group["weight"]):
            single.append({"quantizer": n, "group": qs[n][1], "amax": float(qs[n][0].amax.max()),
                           "error": err(by_group["weight"] | {n})})
        single.sort(key=lambda r: -r["error"])
        print(f"\nper activation quantizer, on top of the weights ({base:.4f}): the 15 worst\n")
        print("| quantizer | group | amax | error vs FP32 |\n|---|---|---|---|")
        for r in single[:15]:
            print(f"| {r['quantizer']} | {r['group']} | {r['amax']:.4g} | {r['error']:.4f} |")
        report["per_layer"] = {"weights_only": base, "rows": single}
    out = args.out / args.case / f"bisect.{args.precision}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
