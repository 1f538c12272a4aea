"""Train the shapes benchmark: render scenes, train the judge, train the UNet + text encoder jointly, save
the weights, then sample held-out captions at FP32 and print the judge's accuracy per attribute.

    PYTHONUNBUFFERED=1 python3 benchmarks/shapes/train.py --device cuda --out OUT/shapes-weights
    python3 benchmarks/shapes/train.py --small --out /tmp/shapes-small     # CPU smoke run, < 60 s

Writes to --out: unet.safetensors, text_encoder.safetensors, judge.safetensors, config.json (model.py),
summary.json (timings, losses, judge accuracy on clean renders, FP32 sample accuracy and Fréchet distance
per guidance scale) and samples.png (the first 256 FP32 samples, 16 per row).
UNet training: epsilon prediction, cosine schedule, 10% of captions dropped to "" for guidance, AdamW with
warmup and cosine decay over the --minutes budget (or --steps), bf16 autocast on CUDA, EMA weights saved.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.shapes` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.shapes import model as M
from benchmarks.shapes.judge import Judge, accuracy, frechet_distance, load_judge
from benchmarks.shapes.render import ATTRIBUTES, caption, labels, render, sample_scenes

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f} s] {msg}", flush=True)


def augment(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Judge training augmentation on float NCHW [0, 1]: colour jitter, blur, Gaussian noise (what a
    sampler's output gets wrong that is not the scene)."""
    n, dev = len(x), x.device

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=dev)

    x = x * (0.85 + 0.3 * u(n, 1, 1, 1)) + 0.06 * (u(n, 3, 1, 1) - 0.5)
    k = torch.tensor([1.0, 2.0, 1.0], device=dev)
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    a = u(n, 1, 1, 1) * (u(n, 1, 1, 1) < 0.5)
    x = x + a * (blurred - x)
    x = x + torch.randn_like(x) * 0.12 * u(n, 1, 1, 1)
    return x.clamp(0, 1)


def train_judge(images: torch.Tensor, lab: dict[str, torch.Tensor], args: argparse.Namespace) -> Judge:
    dev = images.device
    judge = Judge(width=args.judge_width).to(dev)
    opt = torch.optim.AdamW(judge.parameters(), lr=args.judge_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.judge_lr, total_steps=args.judge_steps,
                                                pct_start=0.1)
    for it in range(args.judge_steps):
        idx = torch.randint(0, len(images), (args.judge_batch,), device=dev)
        x = augment(images[idx].permute(0, 3, 1, 2).float() / 255.0)
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            out = judge(x)
        loss = sum(F.cross_entropy(out[k].float(), lab[k][idx]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        sched.step()
        if it % max(1, args.judge_steps // 5) == 0 or it == args.judge_steps - 1:
            log(f"judge step {it:5d}  loss {float(loss.detach()):.4f}")
    return judge.eval()


def lr_at(frac: float, step: int, args: argparse.Namespace) -> float:
    warm = min(1.0, (step + 1) / args.warmup)
    return args.lr * warm * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def train_unet(images: torch.Tensor, tokens: torch.Tensor, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    dev = images.device
    unet, te = M.build_unet(args.small).to(dev), M.build_text_encoder().to(dev)
    log(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, text encoder "
        f"{sum(p.numel() for p in te.parameters()) / 1e6:.3f} M")
    unet.train()
    te.train()
    params = [p for m in (unet, te) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    acp = M.make_scheduler().alphas_cumprod.to(dev)
    empty = M.tokenize([""]).to(dev)
    fwd = torch.compile(unet) if args.compile else unet
    budget = args.minutes * 60
    t_start, step, losses = time.time(), 0, []
    while True:
        frac = step / args.steps if args.steps else (time.time() - t_start) / budget
        if frac >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, step, args)
        idx = torch.randint(0, len(images), (args.batch,), device=dev)
        x0 = images[idx].permute(0, 3, 1, 2).float() / 127.5 - 1
        ids = tokens[idx]
        ids = torch.where((torch.rand(args.batch, 1, device=dev) < args.drop), empty, ids)
        t = torch.randint(0, 1000, (args.batch,), device=dev)
        noise = torch.randn_like(x0)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            enc = te(input_ids=ids).last_hidden_state
            pred = fwd(xt, t, encoder_hidden_states=enc).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.detach())
        step += 1
        if step % args.log_every == 0:
            mean = float(torch.stack(losses[-args.log_every:]).mean())
            el = time.time() - t_start
            log(f"unet step {step:6d}  loss {mean:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{step / el:.1f} it/s")
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    tail = float(torch.stack(losses[-max(1, min(len(losses), 200)):]).mean())
    return unet.eval(), te.eval(), {"steps": step, "seconds": time.time() - t_start, "final_loss": tail}


def save_grid(images: np.ndarray, path: Path, per_row: int = 16) -> None:
    from PIL import Image

    per_row = min(per_row, len(images))
    n = len(images) // per_row * per_row
    g = images[:n].reshape(n // per_row, per_row, *images.shape[1:]).transpose(0, 2, 1, 3, 4)
    Image.fromarray(g.reshape(g.shape[0] * g.shape[1], -1, 3)).save(path)


def main(argv: list[str] | None = None) -> dict:  # type: ignore[type-arg]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--small", action="store_true", help="CPU smoke run: tiny data, tiny UNet, few steps")
    ap.add_argument("--minutes", type=float, default=4.5, help="UNet training budget (wall clock)")
    ap.add_argument("--steps", type=int, default=0, help="UNet training steps (overrides --minutes)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--drop", type=float, default=0.1, help="caption dropout for classifier-free guidance")
    ap.add_argument("--n-train", type=int, default=100_000, help="rendered training images (UNet and judge)")
    ap.add_argument("--judge-steps", type=int, default=1500)
    ap.add_argument("--judge-batch", type=int, default=512)
    ap.add_argument("--judge-lr", type=float, default=2e-3)
    ap.add_argument("--judge-width", type=int, default=32)
    ap.add_argument("--n-test", type=int, default=2000, help="clean renders to test the judge and FD on")
    ap.add_argument("--eval-n", type=int, default=512)
    ap.add_argument("--eval-steps", type=int, default=25)
    ap.add_argument("--guidance", default="1,2,4", help="comma-separated guidance scales to evaluate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet for training")
    ap.add_argument("--log-every", type=int, default=250)
    args = ap.parse_args(argv)
    if args.small:
        # sized for a shared 2-core CPU (a judge step here is ~0.1 s idle, seconds when the machine is busy)
        args.n_train, args.judge_steps, args.judge_batch, args.judge_width = 1000, 40, 32, 8
        args.judge_lr, args.n_test = 5e-3, 200
        args.steps, args.batch, args.warmup, args.log_every = args.steps or 6, 8, 2, 2
        args.eval_n, args.eval_steps, args.guidance = 8, 3, "2"
        torch.set_num_threads(2)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    summary: dict = {"args": {k: str(v) for k, v in vars(args).items()}}  # type: ignore[type-arg]

    # data: one training set (UNet and judge), a clean test set for the judge, held-out eval captions
    scenes = sample_scenes(args.n_train, np.random.default_rng(args.seed))
    images = torch.from_numpy(render(scenes)).to(dev)
    tokens = M.tokenize([caption(s) for s in scenes]).to(dev)
    lab = {k: torch.from_numpy(v).to(dev) for k, v in labels(scenes).items()}
    test = sample_scenes(args.n_test, np.random.default_rng(args.seed + 1))
    test_images = render(test)
    evals = sample_scenes(args.eval_n, np.random.default_rng(args.seed + 2))
    log(f"rendered {len(scenes)} training and {len(test)} test scenes")

    judge = train_judge(images, lab, args)
    summary["judge_clean"] = accuracy(judge, test_images, test)
    noisy = (augment(torch.from_numpy(test_images).to(dev).permute(0, 3, 1, 2).float() / 255,)
             * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    summary["judge_augmented"] = accuracy(judge, noisy, test)
    log(f"judge accuracy clean {summary['judge_clean']}")
    log(f"judge accuracy augmented {summary['judge_augmented']}")

    unet, te, summary["unet_training"] = train_unet(images, tokens, args)
    log(f"UNet trained: {summary['unet_training']}")
    M.save_weights(args.out, unet, te, judge, judge.config())
    del unet, te, judge, images

    # evaluate from the saved files, as the benchmarks will load them
    pipe, judge = M.load_pipeline(args.out, dev), load_judge(args.out, dev)
    real_feats = judge.features(test_images)
    summary["fd_real_vs_real"] = frechet_distance(judge.features(render(evals)), real_feats)
    summary["chance"] = {k: 1 / n for k, n in ATTRIBUTES.items()}
    summary["eval"] = {}
    caps, seeds = [caption(s) for s in evals], list(range(len(evals)))
    for i, g in enumerate(float(x) for x in args.guidance.split(",")):
        t = time.time()
        imgs = pipe(caps, seeds, steps=args.eval_steps, guidance=g)
        acc = accuracy(judge, imgs, evals)
        fd = frechet_distance(judge.features(imgs), real_feats)
        hardest = min(ATTRIBUTES, key=lambda k: acc[k])
        summary["eval"][str(g)] = {"accuracy": acc, "fd": fd, "hardest": hardest, "seconds": time.time() - t}
        log(f"FP32 guidance {g}: " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items())
            + f"  | hardest {hardest}  FD {fd:.3f}")
        if i == 0 or g == 2.0:
            save_grid(imgs, args.out / "samples.png")
    summary["total_seconds"] = time.time() - T0
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(f"done; wrote {args.out} (FD real vs real {summary['fd_real_vs_real']:.3f})")
    return summary


if __name__ == "__main__":
    main()
