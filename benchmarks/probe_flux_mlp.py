"""FLUX.1-dev's MLP shapes on the GPU (bf16, 1024x1024: 4096 image + 512 text tokens, width 3072, MLP 12288):
what Inductor makes of "linear -> GELU(tanh) [-> cat -> linear]" against the GELU done in the GEMM's epilogue
(cuBLASLt, trtkit.runtime.dit_fusions) and, for the single-stream block, proj_out split in two GEMMs instead of
the concatenation. Each variant is torch.compile'd the way the compiled FLUX blocks are, timed as a CUDA graph
of `--iters` calls; the printed ms are per call. Decides which fusions accelerate(compile=...) applies.

Usage (H200):  python benchmarks/probe_flux_mlp.py --out probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn: Any, iters: int) -> float:
    """ms per call of fn() replayed from one CUDA graph of `iters` calls (after warm-up, so compile is out)."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / iters)
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from trtkit.runtime.dit_fusions import linear_gelu_tanh, split_linear

    bf, dev = torch.bfloat16, "cuda"
    torch.manual_seed(0)
    D, H = 3072, 12288

    def w(*s: int) -> Any:
        return torch.randn(*s, device=dev, dtype=bf) * 0.02

    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    wm, bm, wo, bo = w(H, D), w(H), w(D, D + H), w(D)
    w2, b2 = w(D, H), w(D)

    # single-stream block, 4608 tokens: gelu(proj_mlp(x)) cat attention output -> proj_out
    x, attn = w(1, 4608, D), w(1, 4608, D)
    base = torch.compile(lambda x, a: F.linear(torch.cat([a, F.gelu(F.linear(x, wm, bm), approximate="tanh")], 2),
                                               wo, bo), fullgraph=True)
    epi = torch.compile(lambda x, a: F.linear(torch.cat([a, linear_gelu_tanh(x, wm, bm)], 2), wo, bo),
                        fullgraph=True)
    split = torch.compile(lambda x, a: split_linear([a, linear_gelu_tanh(x, wm, bm)], wo, bo), fullgraph=True)
    ref = base(x, attn)
    for name, fn in (("single: inductor", base), ("single: gelu epilogue", epi),
                     ("single: gelu epilogue + split proj_out", split)):
        out = fn(x, attn)
        err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
        res[name] = {"ms": round(timed(lambda fn=fn: fn(x, attn), args.iters), 4), "rel_err": err}
        print(f"{name:40s} {res[name]['ms']:8.4f} ms  rel err {err:.1e}", flush=True)

    # double-stream block feed-forward: image 4096 tokens, context 512
    for m in (4096, 512):
        xi = w(1, m, D)
        base_ff = torch.compile(lambda x: F.linear(F.gelu(F.linear(x, wm, bm), approximate="tanh"), w2, b2),
                                fullgraph=True)
        epi_ff = torch.compile(lambda x: F.linear(linear_gelu_tanh(x, wm, bm), w2, b2), fullgraph=True)
        ref = base_ff(xi)
        for name, fn in ((f"ff {m}: inductor", base_ff), (f"ff {m}: gelu epilogue", epi_ff)):
            out = fn(xi)
            err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
            res[name] = {"ms": round(timed(lambda fn=fn, xi=xi: fn(xi), args.iters), 4), "rel_err": err}
            print(f"{name:40s} {res[name]['ms']:8.4f} ms  rel err {err:.1e}", flush=True)

    # one GEMM for q/k/v and proj_mlp of the single block (N = 3*3072 + 12288) against two
    wq = w(3 * D, D)
    wall = torch.cat([wq, wm])
    two = torch.compile(lambda x: (F.linear(x, wq), F.linear(x, wm)), fullgraph=True)
    one = torch.compile(lambda x: F.linear(x, wall).split([3 * D, H], -1), fullgraph=True)
    for name, fn in (("qkv, mlp: two GEMMs", two), ("qkv+mlp: one GEMM", one)):
        res[name] = {"ms": round(timed(lambda fn=fn: fn(x), args.iters), 4)}
        print(f"{name:40s} {res[name]['ms']:8.4f} ms", flush=True)
    args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
