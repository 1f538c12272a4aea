"""Quality benchmark of trtkit's 8-bit recipes on the trained shapes model (issue 18).

For every mode the same `--samples` captions and noises (seeded) go through guided DDIM; the samples are
scored by the judge CNN (attribute accuracy, Fréchet distance of its penultimate features against real
renders of the same scenes) and against the FP32 sample of the same seed (PSNR, SSIM). Every number
comes with its standard error (metrics.py). Quantized modes are torch fake quantization from calibration
files built by trtkit's calibration code (benchmarks/quality_modes.py) on a separate caption/noise set.

    # H200, all modes, 1000 samples each (about 5 minutes; see docs/calibration.md)
    python3 benchmarks/shapes/bench.py --weights benchmarks/shapes/weights --device cuda --out /tmp/trtkit-shapes
    python3 benchmarks/shapes/report.py /tmp/trtkit-shapes/results.json     # markdown table
    python3 benchmarks/shapes/defaults.py /tmp/trtkit-shapes/results.json   # best INT8 / FP8 recipe
    # CPU smoke run (seconds; untrained weights when --weights has none)
    python3 benchmarks/shapes/bench.py --samples 64 --device cpu --steps 4 --out /tmp/shapes-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # shapes/ and benchmarks/ (quality_modes), run as a script
import metrics  # noqa: E402
import quality_modes as qm  # noqa: E402
import render  # noqa: E402
import sampling  # noqa: E402
from modes import MODES  # noqa: E402


def scenes(n: int, seed: int) -> list[render.Scene]:
    return render.sample_scenes(n, np.random.default_rng(seed))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the samples' range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def record(models: sampling.Models, args: argparse.Namespace) -> Any:
    """Calibration statistics on their own captions and noises (seed + 10000), batches of --calib-batch."""
    cal_scenes = scenes(args.calib_captions, args.seed + 10_000)
    caps = [render.caption(s) for s in cal_scenes]
    g = torch.Generator().manual_seed(args.seed + 10_000)
    noise = torch.randn(len(caps), *models.sample_shape, generator=g)

    def run(stats: Any) -> None:
        for i in range(0, len(caps), args.calib_batch):
            stats.begin_pass()
            sampling.generate(models, models.unet, caps[i: i + args.calib_batch], noise[i: i + args.calib_batch],
                              args.steps, args.guidance, on_step=lambda k: setattr(stats, "step", k))

    return qm.record_stats(models.unet, args.steps, run, seed=args.seed)


def judged(models: sampling.Models, x: torch.Tensor, chunk: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    preds: dict[str, list[np.ndarray]] = {}
    feats = []
    for i in range(0, len(x), chunk):
        p, f = sampling.judge(models, x[i: i + chunk])
        for k, v in p.items():
            preds.setdefault(k, []).append(v)
        feats.append(f)
    return {k: np.concatenate(v) for k, v in preds.items()}, np.concatenate(feats).astype(np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=HERE / "weights",
                    help="trained weights folder (untrained seeded weights where it has none: smoke runs)")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's (sampling.py)")
    ap.add_argument("--calib-captions", type=int, default=32)
    ap.add_argument("--calib-batch", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=1000, help="samples per sampler call")
    ap.add_argument("--boot", type=int, default=100, help="bootstrap resamples of the Fréchet distance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--modes", default="all", help="mode names separated by ';', or all")
    ap.add_argument("--out", type=Path, default=Path("/tmp/trtkit-shapes"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # FP32 means FP32: TF32 would blur the FP32 reference
    torch.backends.cudnn.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    names = list(MODES) if args.modes == "all" else [m.strip() for m in args.modes.split(";") if m.strip()]
    unknown = [m for m in names if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode {unknown[0]!r}; modes: {'; '.join(MODES)}")
    if names[0] != "FP32":
        names = ["FP32", *(n for n in names if n != "FP32")]  # the reference of PSNR, SSIM, paired accuracy

    t_all = time.time()
    models = sampling.load(args.weights, args.device, seed=args.seed)
    if args.guidance is None:
        args.guidance = models.guidance
    print(f"models: {models.source}; device {args.device}", flush=True)

    ev = scenes(args.samples, args.seed)
    caps = [render.caption(s) for s in ev]
    truth = render.labels(ev)
    real = to_tensor(render.render(ev))
    real2 = to_tensor(render.render(scenes(args.samples, args.seed + 20_000)))  # the Fréchet floor
    noise = torch.randn(args.samples, *models.sample_shape, generator=torch.Generator().manual_seed(args.seed))
    real_pred, real_feat = judged(models, real, args.chunk)
    _, real2_feat = judged(models, real2, args.chunk)
    real_acc = metrics.accuracies(real_pred, truth)
    fd_floor, fd_floor_se = metrics.frechet_bootstrap(real2_feat, real_feat, args.boot, args.seed)
    print(f"judge on real renders: all-attributes {real_acc['all']['acc'] * 100:.2f}%; Frechet real vs other "
          f"real {fd_floor:.3f} +- {fd_floor_se:.3f}", flush=True)

    t0 = time.time()
    stats = record(models, args)
    t_record = time.time() - t0
    print(f"calibration statistics: {stats.passes} passes x {stats.steps} steps, {len(stats.amax)} inputs, "
          f"{t_record:.1f} s", flush=True)

    results: dict[str, dict[str, Any]] = {}
    ref_x: torch.Tensor | None = None
    ref_ok: np.ndarray | None = None
    for name in names:
        mode = MODES[name]
        t1 = time.time()
        cal, info = None, {}
        if mode.recipe is not None:
            cal = qm.calibration(stats, models.unet, mode.recipe, args.out / f"calib_{qm.file_name(name)}.json",
                                 run={"benchmark": "shapes", "captions": args.calib_captions,
                                      "batch": args.calib_batch, "steps": args.steps, "guidance": args.guidance})
            info = qm.calibration_info(cal)
        t_cal = time.time() - t1
        outs = []
        with qm.running(models.unet, mode, cal) as (unet, dtype):
            for i in range(0, args.samples, args.chunk):
                outs.append(sampling.generate(models, unet, caps[i: i + args.chunk], noise[i: i + args.chunk],
                                              args.steps, args.guidance, dtype=dtype))
        x = torch.cat(outs).clamp(-1, 1)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t_sample = time.time() - t1 - t_cal
        pred, feat = judged(models, x, args.chunk)
        acc = metrics.accuracies(pred, truth)
        ok = np.all([pred[k] == truth[k] for k in truth], axis=0)
        if ref_x is None:
            ref_x, ref_ok = x, ok
        assert ref_ok is not None
        diff = ok.astype(np.float64) - ref_ok
        fd, fd_se = metrics.frechet_bootstrap(feat, real_feat, args.boot, args.seed)
        r = {**mode.describe(), "accuracy": acc, "acc_diff": float(diff.mean()),
             "acc_diff_se": float(diff.std(ddof=1) / math.sqrt(len(diff))), "frechet": fd, "frechet_se": fd_se,
             "seconds": {"calibration": round(t_cal, 2), "sampling": round(t_sample, 2),
                         "metrics": round(time.time() - t1 - t_cal - t_sample, 2)}, **info}
        if name != "FP32":
            r["psnr"], r["psnr_se"] = metrics.mean_se(metrics.psnr(x, ref_x))
            r["ssim"], r["ssim_se"] = metrics.mean_se(metrics.ssim(x, ref_x))
        results[name] = r
        np.save(args.out / f"samples_{qm.file_name(name)}.npy", to_uint8(x))
        extra = f"  PSNR {r['psnr']:.2f} dB  SSIM {r['ssim']:.4f}" if "psnr" in r else ""
        print(f"{name:44s} all {acc['all']['acc'] * 100:6.2f}% +- {acc['all']['se'] * 100:.2f}  "
              f"FD {fd:7.3f} +- {fd_se:.3f}{extra}  ({time.time() - t1:.1f} s)", flush=True)

    meta = {"samples": args.samples, "steps": args.steps, "guidance": args.guidance,
            "calib_captions": args.calib_captions, "calib_batch": args.calib_batch, "seed": args.seed,
            "device": args.device, "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda")
            else "cpu", "weights": models.source, "boot": args.boot, "torch": torch.__version__,
            "judge_real": real_acc, "frechet_real_floor": fd_floor, "frechet_real_floor_se": fd_floor_se,
            "record_seconds": round(t_record, 2), "total_seconds": round(time.time() - t_all, 2)}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {args.out / 'results.json'} ({meta['total_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
