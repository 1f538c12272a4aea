"""One FLUX.1-dev-size transformer step (bf16, 1024x1024: 4096 image + 512 text tokens, q/k/v fused) in eager
torch under each SDPA backend, and torch's own choice: which attention kernel the compiled rows of
bench_dit.py should ask for. Prints and writes {backend: ms per step}.

Usage (H200):  python benchmarks/probe_dit_attention.py --out probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch
    from diffusers import FluxTransformer2DModel

    from benchmarks.bench_dit import FLUX_DEV
    from trtkit.runtime.kernel_choices import fuse_qkv_shared, sdpa_choice

    torch.manual_seed(0)
    with torch.device("cuda"):
        tf = FluxTransformer2DModel(**FLUX_DEV).to(torch.bfloat16).eval()
    fuse_qkv_shared(tf)
    bf = torch.bfloat16
    kw = dict(hidden_states=torch.randn(1, 4096, 64, device="cuda", dtype=bf),
              encoder_hidden_states=torch.randn(1, 512, 4096, device="cuda", dtype=bf),
              pooled_projections=torch.randn(1, 768, device="cuda", dtype=bf),
              timestep=torch.tensor([0.5], device="cuda", dtype=bf), guidance=torch.tensor([3.5], device="cuda"),
              img_ids=torch.zeros(4096, 3, device="cuda"), txt_ids=torch.zeros(512, 3, device="cuda"),
              return_dict=False)
    res: dict[str, float | str] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    ref = None
    for name in (None, "cudnn", "flash", "efficient"):
        try:
            with torch.no_grad(), sdpa_choice(name):
                out = tf(**kw)[0]
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(args.iters):
                    tf(**kw)
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t) / args.iters * 1e3
            ref = out if ref is None else ref
            err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
            res[name or "torch default"] = round(ms, 2)
            print(f"{name or 'torch default':14s} {ms:8.2f} ms/step  rel err vs default {err:.2e}", flush=True)
        except RuntimeError as e:
            res[name or "torch default"] = f"failed: {str(e).splitlines()[0]}"
            print(f"{name}: failed {str(e).splitlines()[0]}", flush=True)
    args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
