"""Fake FP8 against the torch FP8 path (torchao with trtkit's static scales) on the shapes UNet (issue 18).

The shapes UNet's linears are quantized with `trtkit.runtime.fp8.quantize_fp8` (torchao
Float8StaticActivationFloat8WeightConfig: E4M3 weights per tensor, static per-tensor activation scale
amax/448 from trtkit's calibration) and the whole guided DDIM loop is run; its error to FP32 is compared
with torch fake quantization (trtkit.calibration.fakequant's functions) of the *same* linears:

* the calibration is the benchmark's "FP8 max" recipe, built by trtkit's calibration code on bench.py's
  calibration captions (benchmarks/quality_modes.py), so the ranges are the ones the table uses;
* torchao takes linears only (no convs, no attention BMMs) and only those whose sizes are multiples of 16
  (torch._scaled_mm); `fp8.plan_fp8` says which. The fake-quant side quantizes exactly that set, so both
  sides quantize the same inputs with the same amax;
* torchao runs the model in BF16 (its FP8 GEMMs take BF16 in and give BF16 out), so the main comparison is
  against fake quantization in the same BF16 model with torchao's per-tensor weight scale ("fake bf16");
  fake quantization in FP32 with per-output-channel weights (the calibration file's semantics, what the
  table's fake FP8 does) and plain BF16 are reported beside it, to separate the three effects.

Check: RMSE(torchao, FP32) / RMSE(fake bf16, FP32) within 1 +- --tolerance, over the images and over one
UNet call (the first step's guidance batch), with a bootstrap standard error over images.

    python3 benchmarks/shapes/fp8_torchao_check.py --device cuda --samples 256 --out /tmp/fp8_torchao.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks.shapes` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from benchmarks import quality_modes as qm
from benchmarks._bench_common import add_calibration_args
from benchmarks.shapes import model as M
from benchmarks.shapes import render
from benchmarks.shapes.bench import load, record, to_tensor
from benchmarks.shapes.modes import MODES
from trtkit.calibration import fakequant
from trtkit.calibration.hooks import tapped
from trtkit.runtime import fp8

MODE = "FP8 max"


def select_layers(unet: torch.nn.Module, activations: dict[str, float]) -> tuple[dict[str, float], dict[str, str]]:
    """({linear: amax} that torchao quantizes, {module: why not}) from a calibration's ranges: attention
    inputs and convs are not linears; a linear with a size that is not a multiple of 16 stays BF16."""
    plain = {k: v for k, v in activations.items() if k.rsplit(".", 1)[-1] not in fp8.ATTENTION_INPUTS}
    layers, why_not = fp8.plan_fp8(unet, plain)
    return {k: lay.amax for k, lay in layers.items()}, why_not


@contextlib.contextmanager
def fake_fp8(model: torch.nn.Module, amax: dict[str, float], per_channel: bool) -> Iterator[None]:
    """Fake FP8 of exactly these linears: static activation amax/448 and E4M3 weights, per output channel
    (fakequant.fake_quant_weight, the calibration file's semantics) or per tensor (torchao's)."""
    modules = dict(model.named_modules())
    saved: dict[str, torch.Tensor] = {}

    def tap(key: str, x: torch.Tensor) -> torch.Tensor:
        return fakequant.fake_quant(x, amax[key], "fp8")

    try:
        with torch.no_grad():
            for name in amax:
                w = modules[name].weight
                saved[name] = w.detach().clone()
                wq = (fakequant.fake_quant_weight(w, "fp8") if per_channel
                      else fakequant.fake_quant(w, w.detach().abs().amax().float(), "fp8"))
                w.copy_(wq)
        with tapped(model, {k: "linear" for k in amax}, tap):
            yield
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                modules[name].weight.copy_(w)


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.float() - b.float()) ** 2).mean().sqrt())


def ratio_se(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor, boot: int, seed: int) -> tuple[float, float]:
    """RMSE(a, ref) / RMSE(b, ref) over images, and its bootstrap standard error (resampling images)."""
    ea = ((a.float() - ref.float()) ** 2).flatten(1).mean(1).double()
    eb = ((b.float() - ref.float()) ** 2).flatten(1).mean(1).double()
    r = float((ea.mean() / eb.mean().clamp_min(1e-30)).sqrt())
    g = np.random.default_rng(seed)
    rs = []
    for _ in range(boot):
        i = torch.from_numpy(g.integers(0, len(ea), len(ea)))
        rs.append(float((ea[i].mean() / eb[i].mean().clamp_min(1e-30)).sqrt()))
    return r, float(np.std(rs, ddof=1)) if len(rs) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=Path(__file__).resolve().parent / "weights")
    ap.add_argument("--untrained", action="store_true", help="seeded untrained tiny models (a plumbing check)")
    ap.add_argument("--samples", type=int, default=256)
    add_calibration_args(ap, steps=25, guidance=2.0, prompts="captions")  # what bench.record reads
    ap.add_argument("--boot", type=int, default=200)
    ap.add_argument("--tolerance", type=float, default=0.15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-torchao", action="store_true", help="fake-quant side only (CPU)")
    ap.add_argument("--out", type=Path, required=True, help="JSON summary")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # FP32 means FP32
    torch.backends.cudnn.allow_tf32 = False
    t_all = time.time()
    unet, text_encoder, _, source = load(args)
    recipe = MODES[MODE].recipe
    assert recipe is not None
    stats = record(unet, text_encoder, args)
    with torch.no_grad():
        cal = qm.calibration(stats, unet, recipe, args.out.with_suffix(".calib.json"))
    amax, why_not = select_layers(unet, cal.activations)
    print(f"{len(amax)} linears FP8 on both sides; left out: {len(why_not)} "
          f"({sum('Linear' in w for w in why_not.values())} convs, "
          f"{sum('multiples of 16' in w for w in why_not.values())} linears not multiples of 16)", flush=True)

    ev = render.sample_scenes(args.samples, np.random.default_rng(args.seed))
    caps, seeds = [render.caption(s) for s in ev], np.arange(args.samples) + args.seed * 100_000
    n1 = min(16, args.samples)  # the one-call comparison: the first step's guidance batch of n1 images
    x_in = torch.cat([M.seeded_noise(seeds[:n1])] * 2).to(args.device)
    with torch.no_grad():
        enc = torch.cat([M.encode(text_encoder, [""] * n1), M.encode(text_encoder, caps[:n1])])
    sched: Any = M.make_scheduler()
    sched.set_timesteps(args.steps)
    t0 = sched.timesteps[0]  # the first step: the call with the widest ranges

    def run(model: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            eps = model(x_in.to(dtype), t0, encoder_hidden_states=enc.to(dtype)).sample.float()
        images = M.sample(model, text_encoder, caps, seeds, args.steps, args.guidance, batch_size=args.samples,
                          dtype=dtype)
        return to_tensor(images), eps.cpu()

    res: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    secs: dict[str, float] = {}
    t1 = time.time()
    res["fp32"] = run(unet, torch.float32)
    with fake_fp8(unet, amax, per_channel=True):
        res["fake fp32 per-channel"] = run(unet, torch.float32)
    secs["fp32 + fake fp32"] = time.time() - t1
    bf16 = copy.deepcopy(unet).to(torch.bfloat16)
    res["bf16"] = run(bf16, torch.bfloat16)
    with fake_fp8(bf16, amax, per_channel=False):
        res["fake bf16"] = run(bf16, torch.bfloat16)
    if not args.no_torchao:
        t1 = time.time()
        applied = fp8.quantize_fp8(bf16, amax)
        got = fp8.applied_scales(bf16)
        bad = sorted(k for k in applied if abs(got.get(k, -1) - amax[k] / fp8.FP8_MAX) > 1e-6 * amax[k])
        if bad or set(got) != set(amax):
            raise SystemExit(f"torchao scales differ from trtkit's: {bad[:3]}, {sorted(set(amax) ^ set(got))[:3]}")
        res["torchao"] = run(bf16, torch.bfloat16)
        secs["torchao"] = time.time() - t1

    ref_img, ref_eps = res["fp32"]
    out: dict[str, Any] = {"weights": source, "samples": args.samples, "steps": args.steps, "mode": MODE,
                           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                           "torch": torch.__version__, "fp8_linears": sorted(amax), "left_out": why_not,
                           "variants": {}}
    try:
        import torchao

        out["torchao"] = torchao.__version__
    except ImportError:
        pass
    for k, (img, eps) in res.items():
        if k == "fp32":
            continue
        out["variants"][k] = {"rmse_images_to_fp32": rmse(img, ref_img),
                              "rel_one_call_to_fp32": float((eps - ref_eps).norm() / ref_eps.norm())}
    if "torchao" in res:
        r, se = ratio_se(res["torchao"][0], res["fake bf16"][0], ref_img, args.boot, args.seed)
        one = out["variants"]["torchao"]["rel_one_call_to_fp32"] / out["variants"]["fake bf16"]["rel_one_call_to_fp32"]
        out["ratio_images"], out["ratio_images_se"], out["ratio_one_call"] = r, se, one
        out["rmse_torchao_vs_fake_bf16"] = rmse(res["torchao"][0], res["fake bf16"][0])
        out["pass"] = abs(r - 1) <= args.tolerance and abs(one - 1) <= args.tolerance
    out["seconds"] = {**{k: round(v, 1) for k, v in secs.items()}, "all": round(time.time() - t_all, 1)}
    for k, v in out["variants"].items():
        print(f"{k:24s} RMSE to FP32 (images) {v['rmse_images_to_fp32']:.5f}; one call rel {v['rel_one_call_to_fp32']:.3e}")
    if "ratio_images" in out:
        print(f"torchao / fake bf16: images {out['ratio_images']:.3f} +- {out['ratio_images_se']:.3f}, one call "
              f"{out['ratio_one_call']:.3f} ({'pass' if out['pass'] else 'FAIL'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} ({out['seconds']['all']:.0f} s)")


if __name__ == "__main__":
    main()
