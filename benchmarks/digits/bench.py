"""Quality benchmark of the calibration recipes on the trained digits denoiser.

Every quantized mode is torch fake quantization with exactly the calibration file's semantics
(trtkit.calibration.fakequant: per-output-channel weight scales, per-tensor activation amax/127 or
/448, E4M3 through torch.float8_e4m3fn, SmoothQuant folded into the weights), driven by calibration
files written and re-read through trtkit.calibfile. FP16 runs the UNet in torch.float16 on the CPU.

    flock /tmp/trtkit-heavy.lock python3 benchmarks/digits/bench.py --per-digit 100 --steps 20 --guidance 1.5

Calibration: `--calib-prompts` class labels (digits drawn at random; the "prompts") in batches of
`--calib-batch`, each batch one full 20-step guided DDIM run with its own noise (16 passes x 20 steps by
default, like demoDiffusion's 32 prompts / batch 2). Evaluation: `--per-digit` samples per digit from
one fixed noise tensor shared by every mode, scored by an SVM trained on the digits images.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from model import NULL_CLASS, SIZE, digits_images, load_model, make_scheduler

from trtkit.calibration.calibrate import Recipe
from trtkit.calibration.stats import StepStats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared quality_modes
import quality_modes as qm  # noqa: E402
from _bench_common import add_calibration_args  # noqa: E402

MODES: dict[str, Recipe | str | None] = {
    "FP32": None,
    "FP16": "fp16",
    "INT8 max": Recipe(percentile=1.0, reduction="max", smoothquant=False),
    "INT8 Percentile (min-mean, 1.0)": Recipe(percentile=1.0, reduction="min-mean", smoothquant=False),
    "INT8 Percentile (min, 0.5)": Recipe(percentile=0.5, reduction="min", smoothquant=False),
    "INT8 Percentile (mean, 1.0)": Recipe(percentile=1.0, reduction="mean", smoothquant=False),
    "INT8 Percentile (mean, 1.0) + SmoothQuant": Recipe(percentile=1.0, reduction="mean", smoothquant=True),
    "INT8 Percentile (min-mean, 1.0) + SmoothQuant": Recipe(percentile=1.0, reduction="min-mean",
                                                            smoothquant=True),
    "INT8 max + SmoothQuant": Recipe(percentile=1.0, reduction="max", smoothquant=True),
    "FP8 max (level 4)": Recipe(precision="fp8", level=4.0, percentile=1.0, reduction="max", smoothquant=False),
    "FP8 Percentile (mean, 1.0) (level 4)": Recipe(precision="fp8", level=4.0, percentile=1.0, reduction="mean"),
}


def ddim(unet, emb, labels: torch.Tensor, noise: torch.Tensor, steps: int, guidance: float,  # type: ignore[no-untyped-def]
         on_step=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Guided DDIM; uncond and cond in one UNet batch (as the SDXL pipelines do)."""
    sched = make_scheduler()
    sched.set_timesteps(steps)
    x = noise.clone()
    with torch.no_grad():
        cond = emb(labels)[:, None]
        enc = torch.cat([emb(torch.full_like(labels, NULL_CLASS))[:, None], cond]).to(dtype)
        for i, t in enumerate(sched.timesteps):
            if on_step:
                on_step(i)
            eps = unet(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=enc).sample.float()
            e_u, e_c = eps.chunk(2)
            x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    return x


def add_sampling_args(ap: argparse.ArgumentParser, per_digit: int | None) -> None:
    """The options the digits scripts share: what record_stats reads, and (unless per_digit is None) how many
    evaluation samples eval_samples draws."""
    if per_digit is not None:
        ap.add_argument("--per-digit", type=int, default=per_digit, help="evaluation samples per digit")
    add_calibration_args(ap, steps=20, guidance=1.5, prompts="prompts")
    ap.add_argument("--threads", type=int, default=1)


def eval_samples(per_digit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, noise): `per_digit` of each digit and one fixed noise tensor, shared by every mode compared."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(per_digit)
    return labels, torch.randn(len(labels), 1, SIZE, SIZE, generator=g)


def record_stats(unet, emb, args) -> StepStats:  # type: ignore[no-untyped-def]
    """One recording over level-4 targets (a superset of every mode's); each mode reduces its own part."""
    g = torch.Generator().manual_seed(10_000 + args.seed)  # calibration noise differs from evaluation noise
    n_pass = math.ceil(args.calib_prompts / args.calib_batch)

    def run(stats: StepStats) -> None:
        for _ in range(n_pass):
            labels = torch.randint(0, 10, (args.calib_batch,), generator=g)
            noise = torch.randn(args.calib_batch, 1, SIZE, SIZE, generator=g)
            stats.begin_pass()
            ddim(unet, emb, labels, noise, args.steps, args.guidance, on_step=lambda i: setattr(stats, "step", i))

    return qm.record_stats(unet, args.steps, run, seed=args.seed)


def mode_of(name: str) -> qm.Mode:
    spec = MODES[name]
    return qm.Mode(name, spec if isinstance(spec, Recipe) else None, spec if isinstance(spec, str) else None)


def classifier():  # type: ignore[no-untyped-def]
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    x, y = digits_images()
    xf = x.reshape(len(x), -1).numpy()
    xtr, xte, ytr, yte = train_test_split(xf, y, test_size=0.25, random_state=0, stratify=y)
    clf = SVC(C=10.0, gamma="scale").fit(xtr, ytr)
    return clf, float(clf.score(xte, yte)), len(yte)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_sampling_args(ap, per_digit=100)
    ap.add_argument("--chunk", type=int, default=500)
    ap.add_argument("--modes", default="all", help="mode names separated by ';', or all")
    ap.add_argument("--out", type=Path, default=Path("/tmp/trtkit-digits"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    unet, emb = load_model()
    clf, clf_acc, clf_n = classifier()
    print(f"classifier: SVM, held-out accuracy on real digits {clf_acc:.4f} (n={clf_n})", flush=True)
    t0 = time.time()
    stats = record_stats(unet, emb, args)
    print(f"calibration statistics: {stats.passes} passes x {stats.steps} steps, {len(stats.amax)} inputs, "
          f"{time.time() - t0:.1f} s", flush=True)

    labels, noise = eval_samples(args.per_digit, args.seed)
    modes = list(MODES) if args.modes == "all" else [m.strip() for m in args.modes.split(";")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode {unknown[0]!r}; modes: {'; '.join(MODES)}")
    if modes[0] != "FP32":
        modes.insert(0, "FP32")  # the reference every RMSE is measured against
    results: dict[str, dict] = {}
    ref: torch.Tensor | None = None
    for mode in modes:
        m = mode_of(mode)
        cal, info = None, {}
        if m.recipe is not None:
            cal = qm.calibration(stats, unet, m.recipe, args.out / f"{qm.file_name(mode)}.json",
                                 run={"benchmark": "digits"})
            info = qm.calibration_info(cal)
        t1 = time.time()
        outs = []
        with qm.running(unet, m, cal) as (model, dtype):
            for i in range(0, len(labels), args.chunk):
                outs.append(ddim(model, emb, labels[i: i + args.chunk], noise[i: i + args.chunk], args.steps,
                                 args.guidance, dtype=dtype))
        x = torch.cat(outs).clamp(-1, 1)
        if ref is None:
            ref = x
        pred = clf.predict(x.reshape(len(x), -1).numpy())
        acc = float((pred == labels.numpy()).mean())
        n = len(labels)
        rmse = float(((x - ref) ** 2).mean(dim=(1, 2, 3)).sqrt().mean())
        results[mode] = {"accuracy": acc, "se": math.sqrt(acc * (1 - acc) / n), "n": n, "rmse_to_fp32": rmse,
                         "seconds": time.time() - t1, **info}
        print(f"{mode:48s} acc {acc * 100:6.2f}% +- {results[mode]['se'] * 100:.2f}  "
              f"RMSE to FP32 {rmse:.4f}  ({results[mode]['seconds']:.0f} s) {info}", flush=True)
        np.save(args.out / f"samples_{mode.replace(' ', '_').replace('/', '')}.npy", x.numpy())
    meta = {"per_digit": args.per_digit, "steps": args.steps, "guidance": args.guidance,
            "calib_prompts": args.calib_prompts, "calib_batch": args.calib_batch, "seed": args.seed,
            "classifier_heldout_accuracy": clf_acc, "torch": torch.__version__}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print("\n| mode | accuracy | std. error | latent RMSE to FP32 |\n|---|---|---|---|")
    for m, r in results.items():
        print(f"| {m} | {r['accuracy'] * 100:.2f}% | {r['se'] * 100:.2f} | {r['rmse_to_fp32']:.4f} |")


if __name__ == "__main__":
    main()
