"""FLUX.1-dev / SD3.5-medium denoising loop: diffusers vs the trtkit loop graph, one process ("embeddings in,
latents out": no text encoders, no VAE; prompt embeddings are random tensors of the real shapes).

Builds the transformer of the real architecture (`--size full`: FLUX.1-dev 12B, SD3.5-medium 2.5B) with random
bf16 weights directly on the GPU (constructed under torch.device("cuda") in bf16: seconds, no CPU init), a
diffusers pipeline around it without text encoders or VAE, and times, same seed, same inputs:

  diffusers              pipe(prompt_embeds=..., output_type="latent")  (FluxPipeline / StableDiffusion3Pipeline)
  trtkit graph           trtkit.accelerate(pipe): the whole loop (transformer, CFG, scheduler) as ONE CUDA graph
  trtkit graph+compile   the same after compile_blocks(transformer) (--compile-scope blocks: torch.compile of the
                         repeated blocks only; whole: the whole transformer as one graph; FLUX: q/k/v fused first
                         with executors.fuse_qkv_shared as accelerate(compile=...) does, --no-fuse-qkv to keep them
                         apart); its warm-up holds compile + capture time
  trtkit graph+fp8       with --fp8 auto and trtkit.runtime.fp8 present (branch dit-fp8): each nn.Linear's input
                         amax over one bf16 diffusers run (forward pre-hooks, before any compile), then after the
                         compiled row q/k/v unfused and fp8.quantize_fp8(transformer, amax) (torchao FP8, static
                         activation scales) on the same compiled blocks, then the loop graph; FP8-vs-bf16 latent
                         relative error on the same seed. On a CPU: the ranges only (torchao FP8 needs a GPU).

FLUX: 1024x1024, batch 1, 28 steps, guidance 3.5 (guidance embedding, no CFG), T5 512 x 4096, pooled 768.
SD3.5-medium: 1024x1024, batch 1, 28 steps, CFG 4.5 (batch 2), 333 x 4096 (CLIP 77 + T5 256), pooled 2048.
Targets: trtkit graph+compile >= 1.33x diffusers, trtkit graph+fp8 >= 1.6x.

Usage:  python benchmarks/bench_dit.py --model flux --out flux.json [--fp8 auto]
        python benchmarks/bench_dit.py --model flux --size tiny --device cpu --no-compile --out t.json  (CPU check)
        --compile-scope whole|blocks, --attention cudnn|flash|efficient, --inductor-tuning: the compiled row's
        variants (docs/benchmarks.md, "FLUX compiled-row variants")
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
FLUX_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                  "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
SD35_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
               "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
               "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384,
               "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"}
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FULL = {"flux": (FLUX_DEV, FLUX_SCHEDULER, 512, 3.5), "sd3": (SD35_MEDIUM, SD3_SCHEDULER, 333, 4.5)}


def random_transformer(cls: Any, cfg: dict[str, Any], device: str, dtype: Any) -> Any:
    """`cls(**cfg)` with random weights (from torch's global seed) made in `dtype` where they live: no FP32
    copy, no CPU init. Frozen, in eval mode."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            tf = cls(**cfg)
    finally:
        torch.set_default_dtype(old)
    return tf.eval().requires_grad_(False)


def build(model: str, size: str, device: str, dtype: Any, seed: int) -> tuple[Any, Any, dict[str, Any]]:
    """(transformer, pipeline factory, call kwargs): random weights, real shapes (or the tiny test configs)."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    if size == "full":
        cfg, sched_cfg, text_len, guidance = FULL[model]
    else:
        from trtkit.tiny_dit import tiny_dit_config

        tiny = tiny_dit_config(model)
        cfg, sched_cfg, text_len, guidance = tiny["transformer"], tiny["scheduler"], 16, FULL[model][3]
    cls = FluxTransformer2DModel if model == "flux" else SD3Transformer2DModel
    torch.manual_seed(seed)
    tf = random_transformer(cls, cfg, device, dtype)
    g = torch.Generator("cpu").manual_seed(seed + 1)

    def rnd(*shape: int) -> Any:
        return torch.randn(shape, generator=g).to(device, dtype)

    d, p = cfg["joint_attention_dim"], cfg["pooled_projection_dim"]
    kw: dict[str, Any] = {"prompt_embeds": rnd(1, text_len, d), "pooled_prompt_embeds": rnd(1, p),
                          "guidance_scale": guidance, "output_type": "latent"}

    def make() -> Any:
        sch = FlowMatchEulerDiscreteScheduler(**sched_cfg)
        if model == "flux":
            pipe = FluxPipeline(scheduler=sch, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                tokenizer_2=None, transformer=tf)
        else:
            pipe = StableDiffusion3Pipeline(scheduler=sch, vae=None, text_encoder=None, tokenizer=None,
                                            text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                            tokenizer_3=None, transformer=tf)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    if model == "sd3":
        kw.update(negative_prompt_embeds=rnd(1, text_len, d), negative_pooled_prompt_embeds=rnd(1, p))
    return tf, make, kw


class Timer:
    def __init__(self, device: str, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.rows: dict[str, dict[str, Any]] = {}

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def row(self, name: str, fn: Any, **info: Any) -> Any:
        """Warm-up calls (compilation, capture) timed together, then `repeats` timed calls; the last result."""
        self.sync()
        t0 = time.perf_counter()
        out = None
        for _ in range(self.warmup):
            out = fn()
        self.sync()
        warm = time.perf_counter() - t0
        ms = []
        for _ in range(self.repeats):
            self.sync()
            t = time.perf_counter()
            out = fn()
            self.sync()
            ms.append((time.perf_counter() - t) * 1e3)
        self.rows[name] = {"median_ms": statistics.median(ms), "min_ms": min(ms), "all_ms": ms, "warmup_s": warm,
                           **info}
        print(f"  {name:22s} {statistics.median(ms):9.1f} ms  (min {min(ms):.1f}; warm-up {warm:.1f} s)", flush=True)
        return out


def rel_err(a: Any, b: Any) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def linear_amax(transformer: Any, run: Any) -> dict[str, float]:
    """{nn.Linear name: max |input|} over `run()` (one denoising loop): forward pre-hooks keeping a running max
    on the device (no host sync per call). Used where trtkit.runtime.fp8 has no calibration of its own; the
    ranges of `trtkit calibrate` are the same statistic over a prompt set."""
    import torch

    amax: dict[str, Any] = {}
    hooks = []

    def hook(name: str) -> Any:
        def pre(_m: Any, args: tuple) -> None:
            a = args[0].detach().abs().amax().float()
            amax[name] = a if name not in amax else torch.maximum(amax[name], a)
        return pre

    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_pre_hook(hook(name)))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {k: float(v) for k, v in amax.items()}


def fp8_quantize(transformer: Any, amax: dict[str, float]) -> Any:
    """trtkit.runtime.fp8.quantize_fp8 (branch dit-fp8) in place; its FP8 layers' count. ImportError if absent."""
    fp8 = importlib.import_module("trtkit.runtime.fp8")
    if getattr(transformer, "fused_qkv", False) or any(getattr(m, "fused_projections", False)
                                                         for m in transformer.modules()):
        transformer.unfuse_qkv_projections()  # the ranges are to_q / to_k / to_v's
    applied = fp8.quantize_fp8(transformer, amax)
    return len(applied) if hasattr(applied, "__len__") else None


def eager_again(transformer: Any) -> None:
    """Undo the compiled row on the shared transformer: no compiled forwards, the MLP fusions and the fused q/k/v
    gone (diffusers' own forward, as the first diffusers row ran it)."""
    from trtkit.runtime.dit_fusions import unfuse_flux_mlp

    for m in transformer.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    unfuse_flux_mlp(transformer)
    if any(getattr(m, "fused_projections", False) for m in transformer.modules()):
        transformer.unfuse_qkv_projections()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["flux", "sd3"], default="flux")
    ap.add_argument("--size", choices=["full", "tiny"], default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--height", type=int, default=None, help="default 1024 (tiny: 64)")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled-blocks row")
    ap.add_argument("--no-fuse-qkv", dest="fuse_qkv", action="store_false",
                    help="FLUX: keep q/k/v unfused in the compiled row (default: diffusers' fuse_qkv_projections)")
    ap.add_argument("--compile-scope", choices=["blocks", "whole"], default="blocks",
                    help="what torch.compile takes: the repeated blocks (seconds) or the whole transformer")
    ap.add_argument("--attention", choices=["flash", "efficient", "cudnn"], default=None,
                    help="SDPA backend for the trtkit rows (default: torch's choice, as diffusers)")
    ap.add_argument("--inductor-tuning", action="store_true",
                    help="Inductor's coordinate-descent tuning of its own kernels (longer compile)")
    ap.add_argument("--freezing", action="store_true",
                    help="Inductor freezing: the weights become constants of the compiled graph (inference only)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for the blocks, e.g. "
                    "max-autotune-no-cudagraphs (longer compile); default: torch's default")
    ap.add_argument("--fuse-mlp", action="store_true",
                    help="FLUX: the MLPs' GELU in the GEMM epilogue and the single blocks' proj_out without the "
                         "concatenation (trtkit.runtime.dit_fusions) in the compiled row")
    ap.add_argument("--baseline-again", action="store_true",
                    help="time diffusers again after the other rows; speed-ups are then against the faster of the "
                         "two diffusers medians (other work on the machine during one of them cannot flatter trtkit)")
    ap.add_argument("--fp8", choices=["none", "auto"], default="none")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.baseline_again and args.fp8 != "none":
        ap.error("--baseline-again needs --fp8 none (the FP8 swap cannot be undone for a second diffusers run)")

    import torch

    import trtkit
    from trtkit.runtime.dit_executor import compile_blocks
    from trtkit.runtime.kernel_choices import fuse_qkv_shared, sdpa_choice

    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    h = args.height or (1024 if args.size == "full" else 64)
    w = args.width or (1024 if args.size == "full" else 64)
    t0 = time.perf_counter()
    tf, make, kw = build(args.model, args.size, dev, dtype, args.seed)
    if dev == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in tf.parameters())
    print(f"{args.model} ({args.size}, {n_params / 1e9:.2f} B params) built in {build_s:.1f} s; {h}x{w}, "
          f"{args.steps} steps", flush=True)
    kw |= {"height": h, "width": w, "num_inference_steps": args.steps}

    def call(pipe: Any) -> Any:
        gen = torch.Generator(dev).manual_seed(args.seed)
        with torch.no_grad():
            return pipe(**kw, generator=gen).images

    timer = Timer(dev, args.warmup, args.repeats)
    ref_pipe, acc_pipe = make(), trtkit.accelerate(make())  # two pipelines over the one transformer
    if args.attention:  # DitTorchExecutor's option, read at each call (before the first capture here)
        sdpa_choice(args.attention)
        acc_pipe._trtkit.executor.options["attention"] = args.attention
    if args.inductor_tuning:
        torch._inductor.config.coordinate_descent_tuning = True
    if args.freezing:
        torch._inductor.config.freezing = True
    res: dict[str, Any] = {"rel_err_vs_diffusers": {}}

    def save() -> dict[str, Any]:
        """The JSON as it stands, written after every row: a run cut by the command's time limit keeps its rows."""
        d = min(timer.rows[k]["median_ms"] for k in ("diffusers", "diffusers (again)") if k in timer.rows)
        for r in timer.rows.values():
            r["speedup_vs_diffusers"] = d / r["median_ms"]
        targets = {"trtkit graph+compile": 1.33, "trtkit graph+fp8": 1.6}
        res["targets"] = {k: {"want": v, "got": round(timer.rows[k]["speedup_vs_diffusers"], 3),
                              "met": timer.rows[k]["speedup_vs_diffusers"] >= v} for k, v in targets.items()
                          if k in timer.rows}
        summary = {"model": args.model, "size": args.size, "params_b": n_params / 1e9, "device": dev,
                   "gpu": torch.cuda.get_device_name() if dev == "cuda" else platform.processor(),
                   "torch": torch.__version__, "diffusers": importlib.import_module("diffusers").__version__,
                   "height": h, "width": w, "steps": args.steps, "dtype": str(dtype).replace("torch.", ""),
                   "build_s": build_s, "rows": timer.rows, **res, "captures": acc_pipe._trtkit.runner.captures}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))
        return summary

    base = timer.row("diffusers", lambda: call(ref_pipe))
    graph = timer.row("trtkit graph", lambda: call(acc_pipe))
    res["rel_err_vs_diffusers"]["trtkit graph"] = rel_err(graph, base)
    save()
    amax: dict[str, float] = {}
    if args.fp8 == "auto":  # ranges from the bf16 model, before compile (hooks would re-trace compiled blocks)
        t = time.perf_counter()
        amax = linear_amax(tf, lambda: call(ref_pipe))
        res["fp8_calibrate_s"] = time.perf_counter() - t
    if not args.no_compile:
        try:  # one failing row must not lose the others' numbers
            fused = False
            if args.fuse_qkv and args.model == "flux":  # FLUX's attention processor reads attn.to_qkv once fused
                fuse_qkv_shared(tf)
                fused = True
            mlp = None
            if args.fuse_mlp and args.model == "flux":
                from trtkit.runtime.dit_fusions import fuse_flux_mlp

                mlp = fuse_flux_mlp(tf)
            # lazy: Inductor compiles in the row's warm-up
            compiled = compile_blocks(tf, scope=args.compile_scope, mode=args.compile_mode)
            comp = timer.row("trtkit graph+compile", lambda: call(acc_pipe), compiled=compiled, fuse_qkv=fused,
                             compile_mode=args.compile_mode, compile_scope=args.compile_scope,
                             attention=args.attention, inductor_tuning=args.inductor_tuning,
                             freezing=args.freezing, fuse_mlp=mlp)
            # the warm-up call: compile, eager loop, capture, first replay (the graph runs twice as long as a loop)
            res["compile_and_capture_s"] = timer.rows["trtkit graph+compile"]["warmup_s"]
            res["rel_err_vs_diffusers"]["trtkit graph+compile"] = rel_err(comp, base)
            save()
        except Exception as e:
            res["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"  compile row failed: {res['compile_error']}", flush=True)
    if args.fp8 == "auto":
        try:
            importlib.import_module("trtkit.runtime.fp8")
            res["fp8_layers"] = None
            if not args.no_compile and args.compile_scope == "whole":
                res["fp8"] = "skipped: FP8 runs on the compiled blocks (--compile-scope blocks); a whole-model " \
                             "compile of FP8 FLUX ran past 8 minutes"
                print(f"  fp8 {res['fp8']}", flush=True)
            elif dev != "cuda":
                res["fp8"] = f"skipped: torchao FP8 GEMMs need a GPU ({len(amax)} ranges calibrated)"
                print(f"  fp8 {res['fp8']}", flush=True)
            else:
                t = time.perf_counter()
                res["fp8_layers"] = fp8_quantize(tf, amax)
                res["fp8_quantize_s"] = time.perf_counter() - t
                fp8 = timer.row("trtkit graph+fp8", lambda: call(acc_pipe), compiled=not args.no_compile)
                res["fp8_rel_err_vs_bf16"] = rel_err(fp8, graph)
        except ImportError as e:
            res["fp8"] = f"skipped: {e} (trtkit.runtime.fp8 comes from the dit-fp8 branch)"
            print(f"  fp8 {res['fp8']}", flush=True)
        except Exception as e:
            res["fp8"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"  fp8 {res['fp8']}", flush=True)
    if args.baseline_again:  # the transformer is shared: diffusers' eager forward back first
        eager_again(tf)
        again = timer.row("diffusers (again)", lambda: call(ref_pipe))
        res["rel_err_vs_diffusers"]["diffusers (again)"] = rel_err(again, base)
    summary = save()
    for k, r in timer.rows.items():
        print(f"{k:22s} {r['median_ms']:9.1f} ms  x{r['speedup_vs_diffusers']:.2f}")
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
