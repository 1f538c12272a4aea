"""ControlNet pipelines: diffusers as users call them vs `trtkit.accelerate` (ControlNet + UNet loop as one CUDA
graph, tuned kernels), one process (issue 16).

Builds the real SDXL-base (or SD 1.5) UNet config with random weights and a ControlNet from it
(ControlNetModel.from_unet: the SDXL ControlNet release configs are the UNet's), zero convolutions re-initialised
so the residuals are not zero, fp16 on the GPU, batch 1, guidance on, Euler, and times:

  diffusers     StableDiffusion(XL)ControlNetPipeline(prompt_embeds=..., image=..., output_type="latent"), first
                and again last (the host-bound row drifts with the host; the lower median is the baseline)
  trtkit        the same call on a second pipeline over copies of the modules given to trtkit.accelerate (the
                `tuned` kernels change the modules in place, so diffusers keeps the modules as built)

Both rows time the whole call: prompt embeddings in, control image preprocessing, latents out. Text encoders and
the VAE are left out of both (embeddings in, latents out), as benchmarks/bench_loop.py does. Reported: medians,
speedup (target >= 1.5x for SDXL 1024, 30 steps), trtkit vs diffusers latents (max rel diff), whether trtkit
re-captured when the scale and image changed (it must not). Peak memory of the trtkit rows includes the modules
kept as built for the diffusers rows (two copies of the UNet and ControlNets on the GPU).

Usage:  python benchmarks/bench_controlnet.py --arch sdxl --steps 30 --out cn.json
        python benchmarks/bench_controlnet.py --size tiny --device cpu --steps 2   (CPU smoke)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import _bench_common as common  # benchmarks/ is on sys.path when run as a script
import numpy as np
from _configs import SD15_UNET, SDXL_UNET

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Small versions of the two configs for the CPU smoke run (same block types, few channels).
TINY = {
    "sd15": dict(SD15_UNET, block_out_channels=[32, 32, 64, 64], layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=4, norm_num_groups=8),
    "sdxl": dict(SDXL_UNET, block_out_channels=[32, 64, 64], layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 1, 1], norm_num_groups=8,
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
}


def build(arch: str, size: str, device: str, dtype: Any, seed: int, n_nets: int) -> tuple[Any, Any, dict, int]:
    """(unet, controlnet (one, or a MultiControlNetModel), prompt embeddings, resolution)."""
    import torch
    from diffusers import ControlNetModel, MultiControlNetModel

    if size == "tiny":
        cfg, res = TINY[arch], 64
    else:
        cfg, res = (SDXL_UNET, 1024) if arch == "sdxl" else (SD15_UNET, 512)
    unet = common.random_unet(cfg, device, seed)
    with torch.device(device):
        nets = [ControlNetModel.from_unet(unet) for _ in range(n_nets)]
        for net in nets:  # zero convolutions as any other conv, so the residuals count
            for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
                conv.reset_parameters()
    unet = common.frozen(unet, dtype)
    nets = [common.frozen(n, dtype) for n in nets]
    emb = common.prompt_embeds(cfg, device, dtype, seed + 1)
    return unet, nets[0] if n_nets == 1 else MultiControlNetModel(nets), emb, res


def pipeline(unet: Any, controlnet: Any, sdxl: bool) -> Any:
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetPipeline,
    )

    sched = EulerDiscreteScheduler(**common.SCHEDULER)
    if sdxl:
        pipe = StableDiffusionXLControlNetPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                                   tokenizer_2=None, unet=unet, controlnet=controlnet, scheduler=sched,
                                                   add_watermarker=False)
    else:
        pipe = StableDiffusionControlNetPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                                 controlnet=controlnet, scheduler=sched, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["sdxl", "sd15"], default="sdxl")
    ap.add_argument("--size", choices=["full", "tiny"], default="full")
    ap.add_argument("--controlnets", type=int, default=1, help="2: a MultiControlNetModel of two nets")
    ap.add_argument("--scale", type=float, default=0.8, help="controlnet_conditioning_scale")
    common.add_run_args(ap, repeats=3)
    ap.add_argument("--kernels", default="tuned", help="trtkit.accelerate kernels preset")
    ap.add_argument("--compile", action="store_true",
                    help="an extra row: accelerate(compile=True) on its own copies (torch.compile of the UNet and "
                         "the ControlNets; adds minutes of compilation on SDXL)")
    args = ap.parse_args()

    import torch

    import trtkit

    device, dtype = common.device_and_dtype(args.device)
    t0 = time.perf_counter()
    unet, cn, emb, res = build(args.arch, args.size, device, dtype, 0, args.controlnets)
    sdxl = args.arch == "sdxl"
    n_unet = sum(p.numel() for p in unet.parameters()) / 1e9
    n_cn = sum(p.numel() for p in cn.parameters()) / 1e9
    print(f"built {args.arch}/{args.size} UNet {n_unet:.3f} B + ControlNet {n_cn:.3f} B params in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    plain = pipeline(unet, cn, sdxl)
    acc = trtkit.accelerate(pipeline(copy.deepcopy(unet), copy.deepcopy(cn), sdxl), kernels=args.kernels)

    gi = torch.Generator("cpu").manual_seed(5)
    images = [torch.rand(1, 3, res, res, generator=gi) for _ in range(args.controlnets)]
    x = torch.randn(1, 4, res // 8, res // 8, generator=torch.Generator("cpu").manual_seed(123)).to(device, dtype)

    def call(pipe: Any, image: Any = None, scale: float | None = None) -> Any:
        img = image if image is not None else (images if args.controlnets > 1 else images[0])
        with torch.no_grad():
            return pipe(**emb, image=img, num_inference_steps=args.steps, guidance_scale=args.guidance,
                        height=res, width=res, latents=x, output_type="latent",
                        controlnet_conditioning_scale=args.scale if scale is None else scale).images

    print(f"{args.arch} {res}x{res}, {args.steps} steps, guidance {args.guidance}, {args.controlnets} ControlNet(s), "
          f"batch 1, {dtype}, {device}", flush=True)
    bench = common.Bench(device, args.warmup, args.repeats)
    r_diff = bench.time("diffusers", lambda: call(plain))
    want = call(plain).float().cpu().numpy()
    t = time.perf_counter()
    call(acc)
    print(f"  trtkit first call (warm-up + capture): {time.perf_counter() - t:.1f} s", flush=True)
    r_trt = bench.time(f"trtkit accelerate ({args.kernels}, loop graph)", lambda: call(acc))
    got = call(acc).float().cpu().numpy()
    runner = acc._trtkit.runner
    captures = runner.captures
    # another image and scale: device values, so no new capture, and the new image's latents
    other = [torch.rand(1, 3, res, res, generator=gi) for _ in range(args.controlnets)]
    other_in = other if args.controlnets > 1 else other[0]
    got2 = call(acc, other_in, 0.5).float().cpu().numpy()
    want2 = call(plain, other_in, 0.5).float().cpu().numpy()
    captures_after = runner.captures
    extra: dict[str, Any] = {}
    if args.compile:
        del acc, runner  # one tuned copy of the modules at a time
        import gc

        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        accc = trtkit.accelerate(pipeline(copy.deepcopy(unet), copy.deepcopy(cn), sdxl), kernels=args.kernels,
                                 compile=True)
        t = time.perf_counter()
        call(accc)
        print(f"  trtkit compiled, first call (compile + warm-up + capture): {time.perf_counter() - t:.1f} s", flush=True)
        r_c = bench.time(f"trtkit accelerate ({args.kernels}, compiled, loop graph)", lambda: call(accc))
        extra = {"compiled_vs_diffusers_rel": rel(call(accc).float().cpu().numpy(), want), "compiled_row": r_c["name"]}
        del accc
    base = bench.baseline(r_diff, lambda: call(plain))
    if args.compile:
        extra["compiled_speedup"] = base / next(r["median_ms"] for r in bench.rows if r["name"] == extra["compiled_row"])
    results = {
        "speedup": base / r_trt["median_ms"], "baseline_ms": base,
        "baseline_rule": common.BASELINE_RULE,
        "trtkit_vs_diffusers_rel": rel(got, want), "trtkit_vs_diffusers_rel_new_image_scale": rel(got2, want2),
        "finite": bool(np.isfinite(got).all() and np.isfinite(want).all()),
        "captures_before_new_image_scale": captures, "captures_after": captures_after,
        "recaptured_on_new_image_scale": captures_after != captures,
        "controlnet_effect_rel": rel(got2, got), **extra,
    }
    summary = {"arch": args.arch, "size": args.size, "resolution": res, "steps": args.steps, "guidance": args.guidance,
               "controlnets": args.controlnets, "scale": args.scale, "dtype": str(dtype), "argv": sys.argv,
               "env": common.environment(device),
               "params_b": {"unet": n_unet, "controlnet": n_cn}, "rows": bench.rows, **results}
    common.report(summary, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
