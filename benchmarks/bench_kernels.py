"""Kernel choices of the torch executor: the whole denoising loop as one CUDA graph, per choice, one process.

Each variant is a fresh copy of the same random-weight UNet (fp16, batch 1, guidance on, Euler), wrapped in
TorchExecutor(**options), captured as one graph of all N steps by LoopRunner, and timed by CUDA events around
graph replays on the loop's stream (median of --repeats). Latents are compared with the first variant's.

Usage:  python benchmarks/bench_kernels.py --arch sd15 --steps 30 --repeats 5 --out kernels.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_loop import (  # benchmarks/ is on sys.path when run as a script
    build,
    event_ms,
    loop_inputs,
    parse_kernel_options,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# A variant is its options joined by "+": TorchExecutor options (name or name=value) and, under compile, Inductor
# settings (bench_loop.parse_kernel_options), e.g. "channels_last+attention=cudnn" or "compile+conv_1x1_as_mm".
# --variants takes any such name; these are the default sweeps.
_TUNED = "channels_last+cudnn_benchmark+nhwc_group_norm"
VARIANTS: list[str] = [
    "plain", "cudnn_benchmark", "channels_last", "channels_last+cudnn_benchmark",
    "channels_last+cudnn_benchmark+fuse_qkv", _TUNED, f"{_TUNED}+nhwc_transformer",
    f"{_TUNED}+nhwc_transformer+fused_geglu", f"{_TUNED}+nhwc_transformer+fused_geglu+fuse_qkv",
    "channels_last+cudnn_benchmark+attention=cudnn", "channels_last+cudnn_benchmark+attention=flash",
    "channels_last+cudnn_benchmark+attention=efficient",
]
# Under torch.compile (Inductor picks the kernels; these change what it is given): `--variants compiled`. Not in
# the default sweep: each is a compile of its own (about a minute for SD 1.5, two for SDXL).
COMPILED: list[str] = [
    "compile", "compile+channels_last", "compile+channels_last+nhwc_transformer",
    "compile+channels_last+cudnn_benchmark+conv_1x1_as_mm",
    "compile+channels_last+cudnn_benchmark+conv_1x1_as_mm+fuse_qkv",
]


def options_of(variant: str) -> dict[str, Any]:
    """A variant's name -> TorchExecutor keyword arguments ("plain" is none)."""
    return {} if variant == "plain" else parse_kernel_options(variant.replace("+", ","))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["sdxl", "sd15", "tiny"], default="sd15")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated variants (options joined by '+', as in VARIANTS), or 'compiled' for COMPILED")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from trtkit.runtime.executors import TorchExecutor
    from trtkit.runtime.graph_runner import LoopRunner
    from trtkit.runtime.pipeline import initial_latents
    from trtkit.runtime.schedulers import make_tables

    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    pipe, base, emb, res = build(args.arch, "cuda", torch.float16, seed=0)
    N = args.steps
    tables = make_tables(pipe.scheduler, N, "euler")
    shape, cond = loop_inputs(emb, res)
    x = initial_latents(shape, tables, 123)
    rows: list[dict[str, Any]] = []
    ref = None
    names = list(COMPILED) if args.variants == "compiled" else args.variants.split(",")
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "gpu": torch.cuda.get_device_name()}

    def save() -> None:  # after every row: a sweep cut short by a time limit keeps what it measured
        if args.out:
            args.out.write_text(json.dumps({"arch": args.arch, "resolution": res, "steps": N, "argv": sys.argv,
                                            "env": env, "rows": rows}, indent=1))

    print(f"{args.arch} {res}x{res}, {N} steps, one graph per variant, {torch.cuda.get_device_name()}", flush=True)
    for name in names:
        opts = options_of(name)
        unet = copy.deepcopy(base)
        ex = TorchExecutor(unet, **opts)
        runner = LoopRunner(ex, device="cuda", use_graph=True)
        runner.prepare(shape, tables)
        runner.set_inputs(guidance=args.guidance, x_init=x, **cond)
        t = time.perf_counter()
        try:
            runner.run()
            out = runner.result()
        except Exception as e:  # a backend that cannot run these shapes: report it, go on
            print(f"  {name:46s} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
            rows.append({"variant": name, "options": opts, "error": f"{type(e).__name__}: {e}"[:500]})
            save()
            runner.close()
            del runner, ex, unet
            torch.cuda.empty_cache()
            continue
        setup_s = time.perf_counter() - t
        ms = event_ms(runner.stream, runner.graph.replay, args.repeats)
        if ref is None:
            ref = out
        rel = float(np.abs(out - ref).max() / np.abs(ref).max())
        rows.append({"variant": name, "options": opts, "loop_graph_ms": ms, "per_step_ms": ms / N,
                     "warmup_capture_s": setup_s, "max_rel_diff_vs_first": rel,
                     "finite": bool(np.isfinite(out).all())})
        print(f"  {name:46s} {ms:8.1f} ms  ({ms / N:.2f} ms/step, {ms / rows[0].get('loop_graph_ms', ms):.3f} of first, "
              f"rel diff {rel:.1e}, warm-up+capture {setup_s:.1f} s)", flush=True)
        save()
        runner.close()
        del runner, ex, unet
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
