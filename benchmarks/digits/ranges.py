"""How much each quantized input's range changes over the denoising steps (digits model, level 3).

    python3 benchmarks/digits/ranges.py
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from bench import add_sampling_args, record_stats
from model import load_model

from trtkit.calibration import levels


def main() -> None:
    ap = argparse.ArgumentParser()
    add_sampling_args(ap, per_digit=None)  # calibration statistics only, no evaluation samples
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    unet, emb = load_model()
    stats = record_stats(unet, emb, args)
    keys = set(levels.targets(unet, 3.0))
    ratio, argmin = [], []
    for k, t in stats.amax.items():
        if k in keys:
            per_step = np.nanmax(t, axis=0)  # max over passes at each step
            ratio.append(per_step.max() / per_step.min())
            argmin.append(int(np.argmin(per_step)))
    r, a = np.array(ratio), np.array(argmin)
    print(f"{len(r)} inputs; largest/smallest per-step range: median {np.median(r):.2f}, "
          f"90th percentile {np.percentile(r, 90):.2f}, max {r.max():.2f}; smallest range at step 0 for "
          f"{int((a == 0).sum())}, in the first half for {int((a < args.steps // 2).sum())}")


if __name__ == "__main__":
    main()
