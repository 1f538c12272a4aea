"""Train the digits denoiser (epsilon prediction, cosine schedule, 10% class dropout for guidance).

    flock /tmp/trtkit-heavy.lock python3 benchmarks/digits/train.py --steps 3000
"""

from __future__ import annotations

import argparse
import time

import torch
from model import EMB_DIM, NULL_CLASS, WEIGHTS, digits_images, make_scheduler, make_unet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    x, y = digits_images()
    y = torch.tensor(y)
    unet, emb = make_unet(), torch.nn.Embedding(NULL_CLASS + 1, EMB_DIM)
    print(f"UNet parameters: {sum(p.numel() for p in unet.parameters()) / 1e6:.3f} M")
    sched = make_scheduler()
    acp = sched.alphas_cumprod
    params = list(unet.parameters()) + list(emb.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    ema = [p.detach().clone() for p in params]
    t0 = time.time()
    for it in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch,))
        x0, c = x[idx], y[idx].clone()
        c[torch.rand(args.batch) < 0.1] = NULL_CLASS
        t = torch.randint(0, 1000, (args.batch,))
        noise = torch.randn_like(x0)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(xt, t, encoder_hidden_states=emb(c)[:, None]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                e.lerp_(p.detach(), 1 - 0.995)
        if it % 100 == 0 or it == args.steps - 1:
            print(f"step {it:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f} s", flush=True)
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(WEIGHTS / "unet")
    from safetensors.torch import save_file

    save_file(emb.state_dict(), str(WEIGHTS / "class_embedding.safetensors"))
    print(f"saved to {WEIGHTS} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
