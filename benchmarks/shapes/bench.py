"""Quality benchmark of trtkit's 8-bit recipes on the trained shapes model (issue 18).

For every mode the same `--samples` captions and noises (seeded) go through guided DDIM; the samples are
scored by the judge CNN (attribute accuracy, Fréchet distance of its penultimate features against real
renders of the same scenes) and against the FP32 sample of the same seed (PSNR, SSIM). Every number
comes with its standard error (metrics.py). Quantized modes are torch fake quantization from calibration
files built by trtkit's calibration code (benchmarks/quality_modes.py) on a separate caption/noise set.

    # H200, all 17 modes, 1000 samples each (estimated 2-4 minutes; gpu_run.sh also runs the rest)
    python3 benchmarks/shapes/bench.py --weights benchmarks/shapes/weights --device cuda --out /tmp/trtkit-shapes
    python3 benchmarks/shapes/report.py /tmp/trtkit-shapes/results.json     # markdown table
    python3 benchmarks/shapes/defaults.py /tmp/trtkit-shapes/results.json   # best INT8 / FP8 recipe
    # CPU smoke run (untrained tiny models, 64 samples: it checks the plumbing, measures nothing)
    python3 benchmarks/shapes/bench.py --smoke --out /tmp/shapes-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks.shapes` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from benchmarks import quality_modes as qm
from benchmarks._bench_common import add_calibration_args
from benchmarks.shapes import metrics, render
from benchmarks.shapes import model as M
from benchmarks.shapes.judge import Judge, load_judge
from benchmarks.shapes.modes import MODES

HERE = Path(__file__).resolve().parent
CALIB_SEEDS, EVAL_SEEDS = 1_000_000, 0  # noise seeds: calibration and evaluation never share one
# --untrained: the small model's block kinds at the smallest size (a CPU smoke run, not a measurement)
SMOKE_UNET = dict(M.SMALL_UNET_CONFIG, block_out_channels=(8, 16), attention_head_dim=(1, 1), norm_num_groups=8)


def load(args: argparse.Namespace) -> tuple[Any, Any, Judge, str]:
    if args.untrained:
        torch.manual_seed(args.seed)
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(**SMOKE_UNET).eval().to(args.device)
        return unet, M.build_text_encoder().eval().to(args.device), Judge(8).eval().to(args.device), "untrained"
    if not (args.weights / "config.json").is_file():
        raise SystemExit(f"{args.weights} has no config.json: give --weights the trained folder "
                         "(benchmarks/shapes/train.py --out), or --untrained for a smoke run")
    pipe = M.load_pipeline(args.weights, args.device)
    return pipe.unet, pipe.text_encoder, load_judge(args.weights, args.device), str(args.weights)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1] (PSNR/SSIM data range 2)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def record(unet: Any, text_encoder: Any, args: argparse.Namespace) -> Any:
    """Calibration statistics from their own captions (scenes seed + 10000) and noises, one pass per batch."""
    caps = [render.caption(s) for s in render.sample_scenes(args.calib_captions,
                                                              np.random.default_rng(args.seed + 10_000))]
    seeds = np.arange(len(caps)) + CALIB_SEEDS + args.seed * 100_000

    def run(stats: Any) -> None:
        for i in range(0, len(caps), args.calib_batch):
            stats.begin_pass()
            M.sample(unet, text_encoder, caps[i: i + args.calib_batch], seeds[i: i + args.calib_batch], args.steps,
                     args.guidance, batch_size=args.calib_batch, on_step=lambda k, _t: setattr(stats, "step", k))

    return qm.record_stats(unet, args.steps, run, seed=args.seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=HERE / "weights", help="trained weights folder (train.py --out)")
    ap.add_argument("--untrained", action="store_true", help="seeded untrained tiny models: smoke runs only")
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing check: --untrained --device cpu --samples 64 "
                    "--steps 2 --calib-captions 2 --boot 10 --threads 1 (each still overridable)")
    ap.add_argument("--samples", type=int, default=1000)
    add_calibration_args(ap, steps=25, guidance=2.0, prompts="captions")  # steps, guidance: model.sample's defaults
    ap.add_argument("--chunk", type=int, default=1000, help="images per UNet batch (x2 for guidance)")
    ap.add_argument("--boot", type=int, default=100, help="bootstrap resamples of the Fréchet distance")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--modes", default="all", help="mode names separated by ';', or all")
    ap.add_argument("--out", type=Path, default=Path("/tmp/trtkit-shapes"))
    args = ap.parse_args()
    if args.smoke:
        given = set(sys.argv[1:])
        for flag, value in (("--device", "cpu"), ("--samples", 64), ("--steps", 2), ("--calib-captions", 2),
                            ("--boot", 10), ("--threads", 1)):
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
        args.untrained = True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # FP32 means FP32: TF32 would move the reference
    torch.backends.cudnn.allow_tf32 = False
    names = list(MODES) if args.modes == "all" else [m.strip() for m in args.modes.split(";") if m.strip()]
    unknown = [m for m in names if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode {unknown[0]!r}; modes: {'; '.join(MODES)}")
    names = ["FP32", *(n for n in names if n != "FP32")]  # the reference of PSNR, SSIM, paired accuracy
    args.out.mkdir(parents=True, exist_ok=True)

    t_all = time.time()
    unet, text_encoder, judge, source = load(args)
    print(f"models: {source}; device {args.device}; {len(names)} modes x {args.samples} samples", flush=True)
    ev = render.sample_scenes(args.samples, np.random.default_rng(args.seed))
    caps = [render.caption(s) for s in ev]
    truth = render.labels(ev)
    seeds = np.arange(args.samples) + EVAL_SEEDS + args.seed * 100_000
    real = render.render(ev)
    real_feat = judge.features(real)
    real_acc = metrics.accuracies(judge.predict(real), truth)
    other = render.render(render.sample_scenes(args.samples, np.random.default_rng(args.seed + 20_000)))
    floor, floor_se, _ = metrics.frechet_bootstrap(judge.features(other), real_feat, args.boot, args.seed, args.device)
    print(f"judge on real renders: all attributes {real_acc['all']['acc'] * 100:.2f}%; Frechet distance of "
          f"another real set {floor:.3f} +- {floor_se:.3f}", flush=True)

    t0 = time.time()
    stats = record(unet, text_encoder, args)
    t_record = time.time() - t0
    print(f"calibration statistics: {stats.passes} passes x {stats.steps} steps, {len(stats.amax)} inputs, "
          f"{t_record:.1f} s", flush=True)

    results: dict[str, dict[str, Any]] = {}
    ref_x: torch.Tensor | None = None
    ref_ok: np.ndarray | None = None
    ref_boots: np.ndarray | None = None
    ref_fd = 0.0
    for name in names:
        mode = MODES[name]
        t1 = time.time()
        cal, info = None, {}
        if mode.recipe is not None:
            cal = qm.calibration(stats, unet, mode.recipe, args.out / f"calib_{qm.file_name(name)}.json",
                                 run={"benchmark": "shapes", "captions": args.calib_captions,
                                      "batch": args.calib_batch, "steps": args.steps, "guidance": args.guidance})
            info = qm.calibration_info(cal)
        t_cal = time.time() - t1
        with qm.running(unet, mode, cal) as (model, dtype):
            images = M.sample(model, text_encoder, caps, seeds, args.steps, args.guidance, batch_size=args.chunk,
                              dtype=dtype)
        t_sample = time.time() - t1 - t_cal
        pred = judge.predict(images)
        acc = metrics.accuracies(pred, truth)
        ok = np.logical_and.reduce([pred[k] == truth[k] for k in truth])
        x = to_tensor(images).to(args.device)
        fd, fd_se, boots = metrics.frechet_bootstrap(judge.features(images), real_feat, args.boot, args.seed, args.device)
        if ref_x is None:
            ref_x, ref_ok, ref_boots, ref_fd = x, ok, boots, fd
        assert ref_ok is not None and ref_boots is not None
        diff = ok.astype(np.float64) - ref_ok
        r: dict[str, Any] = {**mode.describe(), "accuracy": acc, "acc_diff": float(diff.mean()),
                             "acc_diff_se": float(diff.std(ddof=1) / math.sqrt(len(diff))),
                             "frechet": fd, "frechet_se": fd_se, "frechet_diff": fd - ref_fd,
                             "frechet_diff_se": float(np.std(boots - ref_boots, ddof=1)) if len(boots) > 1 else 0.0,
                             "frechet_boot": [round(float(b), 6) for b in boots], **info}
        if name != "FP32":
            p = metrics.psnr(x, ref_x)
            r["psnr"], r["psnr_se"] = metrics.mean_se(p[torch.isfinite(p)])
            r["ssim"], r["ssim_se"] = metrics.mean_se(metrics.ssim(x, ref_x))
            r["identical_to_fp32"] = int((x == ref_x).flatten(1).all(1).sum())  # PSNR inf: left out of its mean
        r["seconds"] = {"calibration": round(t_cal, 2), "sampling": round(t_sample, 2),
                        "metrics": round(time.time() - t1 - t_cal - t_sample, 2)}
        results[name] = r
        np.save(args.out / f"samples_{qm.file_name(name)}.npy", images)
        extra = f"  PSNR {r['psnr']:.2f} dB  SSIM {r['ssim']:.4f}" if "psnr" in r else ""
        print(f"{name:28s} all {acc['all']['acc'] * 100:6.2f}% +- {acc['all']['se'] * 100:.2f} "
              f"(paired {r['acc_diff'] * 100:+.2f} +- {r['acc_diff_se'] * 100:.2f})  FD {fd:8.3f} +- {fd_se:.3f} "
              f"(paired {r['frechet_diff']:+.3f} +- {r['frechet_diff_se']:.3f})"
              f"{extra}  ({time.time() - t1:.1f} s) {info or ''}", flush=True)

    meta = {"samples": args.samples, "steps": args.steps, "guidance": args.guidance,
            "calib_captions": args.calib_captions, "calib_batch": args.calib_batch, "seed": args.seed,
            "device": args.device, "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda")
            else "cpu", "weights": source, "boot": args.boot, "torch": torch.__version__,
            "judge_real": real_acc, "frechet_real_floor": floor, "frechet_real_floor_se": floor_se,
            "record_seconds": round(t_record, 2), "total_seconds": round(time.time() - t_all, 2)}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {args.out / 'results.json'} ({meta['total_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
