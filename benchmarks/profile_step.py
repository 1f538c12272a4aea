"""Where one UNet step's GPU time goes: torch.profiler over eager steps of TorchExecutor(**options),
kernels grouped by name, against the step's time as one captured graph.

Usage:  python benchmarks/profile_step.py --arch sd15 --kernel-options channels_last,cudnn_benchmark --out prof.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from bench_loop import (  # benchmarks/ is on sys.path as a script
    build,
    event_ms,
    loop_inputs,
    parse_kernel_options,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["sdxl", "sd15", "tiny"], default="sd15")
    ap.add_argument("--kernel-options", default="")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from trtkit.runtime.executors import TorchExecutor
    from trtkit.runtime.graph_runner import LoopRunner
    from trtkit.runtime.pipeline import initial_latents
    from trtkit.runtime.schedulers import make_tables

    pipe, unet, emb, res = build(args.arch, "cuda", torch.float16, seed=0)
    ex = TorchExecutor(unet, **parse_kernel_options(args.kernel_options))
    tables = make_tables(pipe.scheduler, args.steps, "euler")
    shape, cond = loop_inputs(emb, res)
    r = LoopRunner(ex, device="cuda", use_graph=True)
    r.prepare(shape, tables)
    r.set_inputs(guidance=7.5, x_init=initial_latents(shape, tables, 0), **cond)
    r.run()
    r.result()
    graph_ms = event_ms(r.stream, r.graph.replay, 5) / args.steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        r.eager()
        r.result()
    by: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    total = 0.0
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        by[e.name][0] += us
        by[e.name][1] += 1
        total += us
    rows = sorted(({"kernel": k[:140], "ms_per_step": v[0] / 1e3 / args.steps, "calls_per_step": v[1] / args.steps}
                   for k, v in by.items()), key=lambda d: -d["ms_per_step"])
    kernels = sum(d["calls_per_step"] for d in rows)
    print(f"{args.arch}, options {args.kernel_options or 'none'}: graph {graph_ms:.2f} ms/step; kernel time "
          f"{total / 1e3 / args.steps:.2f} ms/step in {kernels:.0f} kernels/step")
    for d in rows[: args.top]:
        print(f"  {d['ms_per_step']:7.3f} ms {d['calls_per_step']:6.1f}x  {d['kernel']}")
    if args.out:
        args.out.write_text(json.dumps({"graph_ms_per_step": graph_ms, "kernel_ms_per_step": total / 1e3 / args.steps,
                                        "kernels_per_step": kernels, "rows": rows, "argv": sys.argv}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
