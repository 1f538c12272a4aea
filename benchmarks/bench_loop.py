"""The denoising loop: diffusers as users call it vs the trtkit loop (eager / one CUDA graph), one process.

Builds an SDXL-base (or SD 1.5) architecture UNet from the real config written below, with random weights,
fp16, batch 1, guidance on, Euler (the SDXL default scheduler; the same for every row), and times:

  diffusers            pipe(prompt_embeds=..., num_inference_steps=N, output_type="latent")
  diffusers+compile    the same with pipe.unet = torch.compile(unet, fullgraph=True)
  trtkit eager         LoopRunner(TorchExecutor(unet), use_graph=False)
  trtkit graph         LoopRunner(TorchExecutor(unet)) : all N steps (UNet + guidance + scheduler) as ONE graph
  trtkit graph+compile the same over the torch.compile'd UNet (the same compiled module as diffusers+compile)
  trtkit graph, kernel choices   with --kernel-options: LoopRunner(TorchExecutor(copy of unet, **options)),
                       e.g. channels_last,cudnn_benchmark,attention=cudnn (see bench_kernels.py)
  trtkit graph+compile, options  with --compile-options: the same over a copy of the UNet compiled with
                       options (executor options and Inductor settings, e.g. channels_last,fuse_qkv,conv_1x1_as_mm)
  diffusers+compile, options     the pipeline over that same compiled module (diffusers' own speed-up recipe
                       is channels_last + fuse_qkv_projections + conv_1x1_as_mm + torch.compile)
  N x 1-step graph     one captured UNet call replayed N times (the floor the loop graph is compared with)

What is timed: the denoising loop, from initial latents to final latents, as each caller pays for it:
diffusers rows include the pipeline's own per-step Python (scale_model_input, cat, guidance, step) and
its setup (timesteps, latents, time ids); trtkit rows include uploading the initial latents and
waiting for the stream. Text encoders and the VAE are left out of every row (the pipelines are built without
them and take precomputed random prompt embeddings): they run once per image and are the same for all rows.
Peak memory: torch.cuda.max_memory_allocated during the row (weights included) + trtkit's cuda-python buffers.

Usage:  python benchmarks/bench_loop.py --arch sdxl --steps 30 --repeats 5 --out results.json
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import inspect
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _bench_common as common  # benchmarks/ is on sys.path when run as a script
import numpy as np
from _configs import SD15_UNET, SDXL_UNET

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(arch: str, device: str, dtype: Any, seed: int) -> tuple[Any, Any, dict[str, Any], int]:
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    if arch == "tiny":
        from trtkit.tiny import tiny_config

        cfg, res = tiny_config()["unet"], 256
    else:
        cfg, res = (SDXL_UNET, 1024) if arch == "sdxl" else (SD15_UNET, 512)
    unet = common.frozen(common.random_unet(cfg, device, seed), dtype)
    sched = EulerDiscreteScheduler(**common.SCHEDULER)
    emb = common.prompt_embeds(cfg, device, dtype, seed + 1)
    if cfg.get("addition_embed_type") == "text_time":
        pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=sched, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, unet, emb, res


def event_ms(stream: Any, fn: Callable[[], None], repeats: int) -> float:
    """Median device time of fn() enqueued on a torch stream (events on that stream)."""
    import torch

    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            a.record(stream)
            fn()
            b.record(stream)
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def loop_call(runner: Any, x: np.ndarray) -> Callable[[], None]:
    """One timed unit of a trtkit row: upload the initial latents, run the loop (enqueued)."""
    def fn() -> None:
        runner.set_inputs(x_init=x)
        runner.run()
    return fn


def loop_inputs(emb: dict[str, Any], res: int) -> tuple[Any, dict[str, Any]]:
    """The LoopShape (batch 1, CFG on) and the UNet conditioning (negative half first) for build()'s prompt
    embeddings, SDXL's added conditions included."""
    import torch

    from trtkit.runtime.executors import LoopShape

    sdxl = "pooled_prompt_embeds" in emb
    lat = res // 8
    shape = LoopShape(batch=1, latent_channels=4, latent_height=lat, latent_width=lat, cfg=True, text_len=77,
                      text_dim=emb["prompt_embeds"].shape[-1],
                      pooled_dim=emb["pooled_prompt_embeds"].shape[-1] if sdxl else None,
                      time_ids_dim=6 if sdxl else None)
    pe = emb["prompt_embeds"]
    cond = {"encoder_hidden_states": torch.cat([emb["negative_prompt_embeds"], pe])}
    if sdxl:
        cond["text_embeds"] = torch.cat([emb["negative_pooled_prompt_embeds"], emb["pooled_prompt_embeds"]])
        cond["time_ids"] = torch.tensor([[res, res, 0, 0, res, res]] * 2, dtype=pe.dtype, device=pe.device)
    return shape, cond


def graph_row(bench: common.Bench, label: str, ex: Any, shape: Any, tables: Any, guidance: float, cond: dict[str, Any],
              x: np.ndarray, prefix: str = "", **info: Any) -> tuple[np.ndarray, dict[str, float]]:
    """One timed row of the loop as one CUDA graph over executor `ex`: the first call (warm-up, compilation,
    capture) timed apart as setup_s, then the row; returns its latents and its device time against N replays
    of one captured UNet call (events on the loop's stream)."""
    import torch

    from trtkit.runtime.graph_runner import LoopRunner

    r = LoopRunner(ex, device="cuda", use_graph=True)
    r.prepare(shape, tables)
    r.set_inputs(guidance=guidance, **cond)
    t = time.perf_counter()
    r.set_inputs(x_init=x)
    r.run()
    r.result()
    setup_s = time.perf_counter() - t
    print(f"  {label}: warm-up + capture {setup_s:.1f} s", flush=True)

    bench.time(label, loop_call(r, x), extra_bytes=r.loop.bytes, setup_s=setup_s, **info)
    out = r.result()
    one = torch.cuda.CUDAGraph()
    with torch.cuda.graph(one, stream=r.stream):
        ex(r.stream.cuda_stream)
    n = tables.steps
    loop_dev = event_ms(r.stream, r.graph.replay, bench.repeats)
    n1_dev = event_ms(r.stream, lambda: [one.replay() for _ in range(n)], bench.repeats)
    print(f"  {label}: loop graph {loop_dev:.1f} ms vs {n} x one-step graph {n1_dev:.1f} ms: "
          f"{100 * (loop_dev / n1_dev - 1):+.2f}%", flush=True)
    one.reset()
    r.close()
    return out, {f"{prefix}loop_graph_device_ms": loop_dev, f"{prefix}n_x_one_step_graph_ms": n1_dev,
                 f"{prefix}loop_over_n_steps": loop_dev / n1_dev}


def parity(ex: Any, shape: Any, sched_config: Any, steps: int, guidance: float, cond: dict[str, Any],
           device: str) -> dict[str, Any]:
    """Every scheduler family on this UNet: the loop as one graph vs the same loop eager (same executor,
    same initial latents and ancestral noise). Bit-identical is the expectation; the max abs diff is kept."""
    from trtkit.runtime.graph_runner import LoopRunner
    from trtkit.runtime.pipeline import initial_latents
    from trtkit.runtime.schedulers import SCHEDULERS, draw_noise, make_scheduler, make_tables

    out: dict[str, Any] = {}
    for name in sorted(SCHEDULERS):
        tab = make_tables(make_scheduler(name, sched_config), steps, name)
        x = initial_latents(shape, tab, 7)
        noise = draw_noise(tab, shape.latent, 8)
        eager = LoopRunner(ex, device=device, use_graph=False)
        e = eager(shape, tab, x_init=x, guidance=guidance, noise=noise, **cond)
        eager.close()
        graph = LoopRunner(ex, device=device, use_graph=True)
        r = graph(shape, tab, x_init=x, guidance=guidance, noise=noise, **cond)
        graph.close()
        out[name] = {"bit_identical": bool(np.array_equal(r, e)), "max_abs_diff": float(np.abs(r - e).max()),
                     "finite": bool(np.isfinite(r).all())}
        print(f"  parity {name:10s} graph vs eager: bit-identical {out[name]['bit_identical']}, "
              f"max abs diff {out[name]['max_abs_diff']:.1e}", flush=True)
    return out


def parse_kernel_options(text: str) -> dict[str, Any]:
    """"channels_last,attention=cudnn,conv_1x1_as_mm" -> TorchExecutor keyword arguments; names that are not
    TorchExecutor's are Inductor settings and go into compile_options. Values are Python literals or strings."""
    from trtkit.runtime.executors import TorchExecutor

    own = set(inspect.signature(TorchExecutor).parameters)
    out: dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        k, _, v = item.partition("=")
        try:
            val = ast.literal_eval(v) if v else True
        except (ValueError, SyntaxError):
            val = v
        if k in own:
            out[k] = val
        else:
            out.setdefault("compile_options", {})[k] = val
    return out


@contextlib.contextmanager
def alone_on_device(unet: Any, device: str) -> Iterator[Any]:
    """A device copy of `unet` to change (layout, fused projections) while the original waits on the host, so
    that the other rows keep the UNet as built and this row's peak memory holds one UNet, like theirs."""
    import torch

    unet.to("cpu")
    torch.cuda.empty_cache()
    try:
        yield copy.deepcopy(unet).to(device)
    finally:
        torch.cuda.empty_cache()
        unet.to(device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["sdxl", "sd15", "tiny"], default="sdxl")
    common.add_run_args(ap, repeats=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-parity", action="store_true",
                    help="skip the graph-vs-eager latents check for every scheduler on this UNet")
    ap.add_argument("--kernel-options", default="",
                    help="comma-separated TorchExecutor options for an extra graph row, e.g. "
                         "channels_last,cudnn_benchmark,attention=cudnn")
    ap.add_argument("--compile-options", default="",
                    help="options for an extra pair of compiled rows (trtkit graph and diffusers over one module): "
                         "TorchExecutor options and Inductor settings, e.g. channels_last,fuse_qkv,conv_1x1_as_mm")
    args = ap.parse_args()

    import torch

    from trtkit.runtime.executors import TorchExecutor
    from trtkit.runtime.graph_runner import LoopRunner
    from trtkit.runtime.kernel_choices import describe_options
    from trtkit.runtime.pipeline import initial_latents
    from trtkit.runtime.schedulers import make_tables

    device, dtype = common.device_and_dtype(args.device)
    t_build = time.perf_counter()
    pipe, unet, emb, res = build(args.arch, device, dtype, seed=0)
    print(f"built {args.arch} UNet ({sum(p.numel() for p in unet.parameters()) / 1e9:.3f} B params) in "
          f"{time.perf_counter() - t_build:.1f} s", flush=True)
    N, g = args.steps, args.guidance
    bench = common.Bench(device, args.warmup, args.repeats)
    gen_seed = 123

    tables = make_tables(pipe.scheduler, N, "euler")
    shape, cond = loop_inputs(emb, res)
    x = initial_latents(shape, tables, gen_seed)
    x_lat = torch.from_numpy(x / np.float32(tables.init_noise_sigma)).to(device, dtype)

    def diffusers_call() -> Any:
        with torch.no_grad():
            return pipe(**emb, num_inference_steps=N, guidance_scale=g, height=res, width=res,
                        latents=x_lat, output_type="latent").images

    print(f"{args.arch} {res}x{res}, {N} steps, guidance {g}, batch 1, {dtype}, {device}", flush=True)
    r_diff = bench.time("diffusers", diffusers_call)
    ref_latents = diffusers_call().float().cpu().numpy()

    ex = TorchExecutor(unet)

    eager = LoopRunner(ex, device=device, use_graph=False)
    eager.prepare(shape, tables)
    eager.set_inputs(guidance=g, **cond)
    bench.time("trtkit eager loop", loop_call(eager, x), extra_bytes=getattr(eager.loop, "bytes", 0))
    out_eager = eager.result()
    results: dict[str, Any] = {}
    if device == "cuda":
        out_graph, dev = graph_row(bench, "trtkit graph loop", ex, shape, tables, g, cond, x)
        results.update(dev)
        results["graph_vs_eager_max_abs"] = float(np.abs(out_graph - out_eager).max())
        results["graph_vs_eager_bit_identical"] = bool(np.array_equal(out_graph, out_eager))
        results["trtkit_vs_diffusers_rel"] = float(np.abs(out_graph - ref_latents).max() / np.abs(ref_latents).max())
        if not args.no_parity:
            results["graph_vs_eager_per_scheduler"] = parity(ex, shape, pipe.scheduler.config, N, g, cond, device)
        if not args.no_compile:
            exc = TorchExecutor(unet, compile=True)
            out_c, dev = graph_row(bench, "trtkit graph loop + compile", exc, shape, tables, g, cond, x,
                                   prefix="compiled_")
            results.update(dev)
            results["compiled_graph_vs_diffusers_rel"] = float(
                np.abs(out_c - ref_latents).max() / np.abs(ref_latents).max())
            pipe.unet = exc.fn  # the same compiled module: the guards match, no second compile
            t = time.perf_counter()
            diffusers_call()
            print(f"  diffusers with the compiled UNet, first call: {time.perf_counter() - t:.1f} s", flush=True)
            bench.time("diffusers + compile", diffusers_call)
            pipe.unet = unet
    if device == "cuda" and args.kernel_options:
        opts = parse_kernel_options(args.kernel_options)
        with alone_on_device(unet, device) as twin:
            tuned = TorchExecutor(twin, **opts)
            out_tuned, dev = graph_row(bench, "trtkit graph loop, " + describe_options(opts, "+"), tuned, shape, tables, g,
                                       cond, x, prefix="tuned_", kernel_options=opts)
            del tuned, twin
        results.update(dev)
        results["kernel_options"] = opts
        results["tuned_vs_plain_graph_rel"] = float(np.abs(out_tuned - out_graph).max() / np.abs(out_graph).max())
        results["tuned_vs_diffusers_rel"] = float(np.abs(out_tuned - ref_latents).max() / np.abs(ref_latents).max())
    if device == "cuda" and args.compile_options:
        opts = parse_kernel_options(args.compile_options)
        label = describe_options(opts, "+")
        with alone_on_device(unet, device) as twin:
            exo = TorchExecutor(twin, compile=True, **opts)
            out_o, dev = graph_row(bench, f"trtkit graph loop + compile, {label}", exo, shape, tables, g, cond, x,
                                   prefix="compiled_opts_", compile_options=opts)
            pipe.unet = exo.fn  # the same compiled module, as in the plain pair
            t = time.perf_counter()
            diffusers_call()
            print(f"  diffusers + compile, {label}, first call: {time.perf_counter() - t:.1f} s", flush=True)
            bench.time(f"diffusers + compile, {label}", diffusers_call, compile_options=opts)
            pipe.unet = unet
            del exo, twin
        results.update(dev)
        results["compile_options"] = opts
        results["compiled_opts_vs_diffusers_rel"] = float(
            np.abs(out_o - ref_latents).max() / np.abs(ref_latents).max())
    results["baseline_ms"] = bench.baseline(r_diff, diffusers_call)
    results["baseline_rule"] = common.BASELINE_RULE
    summary = {"arch": args.arch, "resolution": res, "steps": N, "guidance": g, "dtype": str(dtype),
               "argv": sys.argv, "env": common.environment(device), "rows": bench.rows, **results}
    common.report(summary, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
