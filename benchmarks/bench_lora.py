"""LoRA switch time: two random LoRAs on a random-weight UNet (SDXL by default, 1024x1024, 30 steps), switched
between calls. Rows (each a switch + one full denoising call, latents out, prompt embeddings given):
  diffusers set_adapters      pipe.set_adapters([x]) then diffusers' own loop
  trtkit set_adapters         the same on the accelerated pipe (a new loop-graph capture each switch)
  trtkit fused swap           unfuse_lora(); set_adapters([x]); fuse_lora() then the accelerated call (no capture)
  trtkit no switch            the accelerated call alone
and the switch alone (no call) for diffusers' set_adapters and the fused swap. Captures are counted (the runner's
counter), printed and written with the rows to --out; a fused-swap capture makes the exit status 1.

    python3 benchmarks/bench_lora.py --arch sdxl --device cuda            # the issue's measurement (H200)
    python3 benchmarks/bench_lora.py --arch tiny --device cpu --steps 2 --res 64 --repeats 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import Bench  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from bench_loop import build  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["sdxl", "sd15", "tiny"], default="sdxl")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--res", type=int, default=None, help="image size (default: the model's)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    import trtkit
    from trtkit.tiny_lora import random_lora_state, save_diffusers

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe, unet, emb, res = build(args.arch, args.device, dtype, seed=0)
    res = args.res or res
    tmp = Path(tempfile.mkdtemp(prefix="trtkit-lora-"))
    cls = type(pipe)
    for i, name in enumerate(("a", "b")):
        # std 0.2: a LoRA that visibly changes the image and keeps fp16 activations finite
        state = {k: v.cpu() for k, v in random_lora_state(unet, seed=10 + i, rank=args.rank, std=0.2).items()}
        pipe.load_lora_weights(str(save_diffusers(state, tmp, f"{name}.safetensors", cls)), adapter_name=name)

    def call(p: Any) -> None:
        p(num_inference_steps=args.steps, guidance_scale=7.5, height=res, width=res, output_type="latent",
          generator=torch.Generator("cpu").manual_seed(0), **emb)

    bench = Bench(args.device, args.warmup, args.repeats)
    flip = {"x": "a"}

    def other() -> str:
        flip["x"] = "b" if flip["x"] == "a" else "a"
        return flip["x"]

    def diffusers_switch() -> None:
        pipe.set_adapters([other()])
        call(pipe)

    t_start = time.perf_counter()
    bench.time("diffusers set_adapters", diffusers_switch)
    bench.time("diffusers set_adapters alone", lambda: pipe.set_adapters([other()]))
    trtkit.accelerate(pipe)
    runner = pipe._trtkit.runner
    c0 = runner.captures

    def trtkit_switch() -> None:
        pipe.set_adapters([other()])
        call(pipe)

    bench.time("trtkit set_adapters", trtkit_switch, captures_before=c0)
    captures = {"set_adapters rows": runner.captures - c0}
    print(f"  captures during trtkit set_adapters rows: {captures['set_adapters rows']}")
    pipe.fuse_lora()

    def swap() -> None:
        pipe.unfuse_lora()
        pipe.set_adapters([other()])
        pipe.fuse_lora()

    def trtkit_fused() -> None:
        swap()
        call(pipe)

    call(pipe)  # the fused state's one capture
    c1 = runner.captures
    bench.time("trtkit fused swap", trtkit_fused)
    bench.time("trtkit no switch", lambda: call(pipe))
    bench.time("fused swap alone", swap)
    captures["fused swap rows"] = runner.captures - c1
    print(f"  captures during fused-swap rows: {captures['fused swap rows']} (0 expected)")
    rows = {r["name"]: r["median_ms"] for r in bench.rows}
    summary = {"switch + call, diffusers set_adapters (ms)": rows["diffusers set_adapters"],
               "switch + call, trtkit fused swap, no re-capture (ms)": rows["trtkit fused swap"],
               "switch alone, diffusers set_adapters (ms)": rows["diffusers set_adapters alone"],
               "switch alone, trtkit fused swap (ms)": rows["fused swap alone"]}
    print("  " + "; ".join(f"{k} {v:.1f}" for k, v in summary.items()))
    print(f"  total {time.perf_counter() - t_start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"arch": args.arch, "device": args.device, "steps": args.steps, "res": res,
                                        "rank": args.rank, "time": time.time(), "captures": captures,
                                        "summary": summary, "rows": bench.rows}, indent=2))
    if captures["fused swap rows"]:
        print("  ERROR: the fused swap re-captured the loop graph", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
