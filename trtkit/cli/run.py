from __future__ import annotations

from pathlib import Path

import typer

from trtkit.cli._common import check_device, check_image_size, console, err_console, print_json


def _config(model_dir: Path, engines: Path | None, prompt: str, negative_prompt: str, steps: int,
            guidance: float | None, scheduler: str | None, seed: int, cuda_graph: bool, height: int | None, width: int | None,
            trust_engine: bool, device: str | None, compile: bool, kernels: str,
            backend: str | None = None, lora: Path | None = None,
            lora_scale: float | None = None):  # type: ignore[no-untyped-def]
    from trtkit.errors import TrtkitError
    from trtkit.runtime.kernel_choices import KERNEL_PRESETS
    from trtkit.runtime.pipeline import RunConfig
    from trtkit.runtime.schedulers import SCHEDULERS

    if scheduler is not None and scheduler not in SCHEDULERS:
        raise TrtkitError(f"unknown scheduler {scheduler!r}", hint=f"choose one of {', '.join(SCHEDULERS)}")
    if steps < 1:
        raise TrtkitError("--steps must be >= 1")
    if device not in (None, "cpu", "cuda"):
        raise TrtkitError(f"--device must be cpu or cuda, got {device!r}")
    if backend not in (None, "trt", "rtx"):
        raise TrtkitError(f"--backend must be trt or rtx, got {backend!r}")
    if backend is not None and engines is None:
        raise TrtkitError("--backend picks the TensorRT that runs --engines; give --engines too")
    check_image_size(height, width)
    check_device(device)
    if kernels not in KERNEL_PRESETS:
        raise TrtkitError(f"--kernels must be one of {', '.join(KERNEL_PRESETS)}, got {kernels!r}")
    if lora_scale is not None and lora is None:
        raise TrtkitError("--lora-scale needs --lora")
    weights = None
    if lora is not None:
        from trtkit._files import check_input

        check_input(lora, "LoRA file")
        from trtkit.runtime.pipeline_dit import is_dit_folder

        if is_dit_folder(model_dir):  # before --engines reads a UNet plan's metadata
            raise TrtkitError("--lora is for SD/SDXL UNet folders; FLUX/SD3 folders do not take it yet "
                              "(with or without --engines)")
        if engines is not None:  # before the (slow) pipeline load
            weights = _engine_lora(engines, lora, lora_scale)
    return RunConfig(model_dir=model_dir, prompt=prompt, negative_prompt=negative_prompt, steps=steps,
                     guidance=guidance, scheduler=scheduler, seed=seed, height=height, width=width,
                     cuda_graph=cuda_graph, engines=engines, trust_engine=trust_engine, device=device,
                     compile=compile, kernels=kernels, backend=backend, lora=None if engines else lora,
                     lora_scale=1.0 if lora_scale is None else lora_scale, unet_weights=weights)


def _engine_lora(engines: Path, lora: Path, scale: float | None) -> dict:
    """The UNet engine's new weights for `--engines DIR --lora FILE`: FILE is a weights file (`trtkit refit -o
    x.safetensors`, its scale baked in) or a LoRA adapter, computed here as `trtkit refit` would. Refused with one
    line when the plan's metadata says it was not built --refittable."""
    from trtkit.builder import metadata as md
    from trtkit.errors import TrtkitError
    from trtkit.runtime.refit import read_weights

    plan = engines if engines.suffix in (".plan", ".engine") else engines / "unet.plan"
    meta = md.read_metadata(plan.with_suffix(".json"))
    if meta is not None and not (meta.get("settings") or {}).get("refittable"):
        raise TrtkitError(f"{plan} was not built with --refittable: --lora cannot change its weights",
                          hint="rebuild it with `trtkit build --refittable`, or run the torch UNet (no --engines)")
    found = read_weights(lora)
    if found is not None:
        weights, info = found
        if scale is not None and scale != info.get("scale"):
            raise TrtkitError(f"{lora} holds weights refit at scale {info.get('scale')}; --lora-scale cannot change "
                              "that", hint="run `trtkit refit --scale` again, or pass the adapter itself as --lora")
        return weights
    if meta is None:
        raise TrtkitError(f"{plan.with_suffix('.json')} (the plan's metadata) is missing; a LoRA adapter needs it to "
                          "find the ONNX the plan came from", hint="write a weights file with `trtkit refit -o`")
    from trtkit.builder.refit import refit_weights

    return refit_weights(meta, lora, 1.0 if scale is None else scale).weights


BACKEND_HELP = ("trt or rtx: the TensorRT that runs --engines (default: the one that built each plan, read "
                "from its header).")


def loop_label(cuda_graph: bool, compiled: bool) -> str:
    """How the denoising loop ran, for the result line and the bench title."""
    if cuda_graph:
        return "one CUDA graph"
    return "torch.compile'd UNet, step by step" if compiled else "eager loop"


def _warn_compile_on_cpu(compile: bool, device: str | None) -> None:
    if not compile or device == "cuda":
        return
    from trtkit.runtime.pipeline import default_device

    if (device or default_device()) == "cpu":
        err_console.print("note: --compile on the CPU compiles the UNet first, which takes far longer than it saves "
                          "for a few images (newcomer trial, demo UNet: 52 s for 4 steps; 5.6 s for 30 steps without)",
                          markup=False)


def _denoiser(model_dir: Path) -> str:
    from trtkit.runtime.pipeline_dit import is_dit_folder

    return "transformer" if is_dit_folder(model_dir) else "UNet"


def _default_output(output: Path | None) -> Path:
    """The image to write where -o names no file (none, or a folder): out.png, or out-N.png beside an existing
    one (said on stderr), rather than silently replacing the previous run's image."""
    if output is not None and not output.is_dir():
        return output
    from trtkit._files import unused_name

    path = unused_name(output if output is not None else Path("."), "out.png")
    if path.name != "out.png":
        err_console.print(f"note: {path.with_name('out.png')} exists; writing {path} (-o names the file)",
                          markup=False)
    return path


def register(app: typer.Typer) -> None:
    common_help = "The diffusers pipeline folder (text encoders, VAE, and the UNet unless --engines has one)."

    @app.command("run")
    def run(
        model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help=common_help),
        prompt: str = typer.Option(..., "--prompt", help="What to draw."),
        negative_prompt: str = typer.Option("", "--negative-prompt", help="What not to draw."),
        engines: Path = typer.Option(None, "--engines", help="Folder with unet.plan (SD/SDXL) or transformer.plan (FLUX/SD3), TensorRT; else torch."),
        steps: int = typer.Option(30, "--steps", help="Denoising steps."),
        guidance: float = typer.Option(None, "--guidance", help="Guidance scale (<= 1: CFG off; default: the "
                                        "pipeline's: SD/SDXL 7.5, FLUX.1 3.5, SD3 7)."),
        scheduler: str = typer.Option(None, "--scheduler", help="euler | euler_a | ddim | dpmpp_2m "
                                      "(default: the folder's scheduler)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the initial latents."),
        cuda_graph: bool = typer.Option(True, "--cuda-graph/--no-cuda-graph",
                                        help="Run all steps as one CUDA graph (GPU only)."),
        height: int = typer.Option(None, "--height", help="Image height, a multiple of 8, of 16 for FLUX/SD3 (default: the model's)."),
        width: int = typer.Option(None, "--width", help="Image width, a multiple of 8, of 16 for FLUX/SD3 (default: the model's)."),
        trust_engine: bool = typer.Option(False, "--trust-engine", help="Allow plans that carry host code "
                                          "(version-compatible plans). Only for plans you trust."),
        device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda if present)."),
        compile: bool = typer.Option(False, "--compile", help="torch.compile the torch UNet."),
        kernels: str = typer.Option("tuned", "--kernels", help="Torch UNet on a GPU: tuned (channels-last "
                                    "activations, cuDNN autotune, fused GEGLU and q/k/v; docs/runtime.md) or plain."),
        backend: str = typer.Option(None, "--backend", help=BACKEND_HELP),
        output: Path = typer.Option(None, "--output", "-o", help="Image to write (.png/.jpg/.webp); a folder or "
                                    "none: out.png there (out-1.png, ... where it exists: never replaced)."),
        json_out: bool = typer.Option(False, "--json", help="Print the timings as JSON."),
        lora: Path = typer.Option(None, "--lora", help="A LoRA adapter (diffusers/PEFT or kohya safetensors), fused "
                                  "into the torch UNet; with --engines (built --refittable) the adapter or the "
                                  "weights file of `trtkit refit -o x.safetensors`, set by TensorRT's Refitter at load."),
        lora_scale: float = typer.Option(None, "--lora-scale", help="LoRA strength (default 1.0)."),
    ) -> None:
        """Text -> image through the trtkit runtime (the denoising loop as one CUDA graph on a GPU)."""
        from trtkit.runtime.pipeline import run as do_run

        cfg = _config(model_dir, engines, prompt, negative_prompt, steps, guidance, scheduler, seed, cuda_graph,
                      height, width, trust_engine, device, compile, kernels, backend, lora, lora_scale)
        _warn_compile_on_cpu(compile and engines is None, device)
        output = _default_output(output)
        res = do_run(cfg, output)
        output = res.path or output  # a folder as -o: the file written in it
        info = {"output": str(output), "executor": res.executor, "cuda_graph": res.cuda_graph,
                **{f"{k}_ms": round(v, 1) for k, v in res.timings_ms.items()}}
        if json_out:
            print_json(info)
        else:
            console.print(f"wrote {output} ({res.executor} {_denoiser(model_dir)}, {loop_label(res.cuda_graph, compile)}"
                          f", {res.timings_ms['total']:.0f} ms: denoise {res.timings_ms['denoise']:.0f} ms)")

    @app.command("bench")
    def bench(
        model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help=common_help),
        prompt: str = typer.Option("a photo of an astronaut riding a horse", "--prompt", help="What to draw."),
        engines: Path = typer.Option(None, "--engines", help="Folder with unet.plan (SD/SDXL) or transformer.plan (FLUX/SD3), TensorRT; else torch."),
        steps: int = typer.Option(30, "--steps", help="Denoising steps per run."),
        guidance: float = typer.Option(None, "--guidance", help="Guidance scale (<= 1: CFG off; default: the "
                                        "pipeline's: SD/SDXL 7.5, FLUX.1 3.5, SD3 7)."),
        scheduler: str = typer.Option(None, "--scheduler", help="euler | euler_a | ddim | dpmpp_2m (default: the "
                                      "folder's scheduler)."),
        cuda_graph: bool = typer.Option(True, "--cuda-graph/--no-cuda-graph", help="Run all steps as one CUDA graph "
                                        "(GPU only)."),
        height: int = typer.Option(None, "--height", help="Image height, a multiple of 8, of 16 for FLUX/SD3 (default: the model's)."),
        width: int = typer.Option(None, "--width", help="Image width, a multiple of 8, of 16 for FLUX/SD3 (default: the model's)."),
        warmup: int = typer.Option(2, "--warmup", help="Untimed runs first (compilation, capture)."),
        repeats: int = typer.Option(5, "--repeats", help="Timed runs; the table shows their median and minimum."),
        trust_engine: bool = typer.Option(False, "--trust-engine", help="Allow plans that carry host code. Only for "
                                          "plans you trust."),
        device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda if present)."),
        compile: bool = typer.Option(False, "--compile", help="torch.compile the torch UNet (slow on the CPU)."),
        kernels: str = typer.Option("tuned", "--kernels", help="tuned | plain (torch UNet on a GPU)."),
        backend: str = typer.Option(None, "--backend", help=BACKEND_HELP),
        json_out: bool = typer.Option(False, "--json", help="Print the timings as JSON."),
    ) -> None:
        """Per-step and end-to-end latency (median of --repeats after --warmup runs)."""
        from trtkit.runtime.pipeline import bench as do_bench

        cfg = _config(model_dir, engines, prompt, "", steps, guidance, scheduler, 0, cuda_graph, height, width,
                      trust_engine, device, compile, kernels, backend)
        _warn_compile_on_cpu(compile and engines is None, device)
        s = do_bench(cfg, warmup, repeats).summary()
        if json_out:
            print_json(s)
            return
        from rich.table import Table

        t = Table(title=f"trtkit bench: {s['executor']} {_denoiser(model_dir)} on {s['device']}, "
                        f"{loop_label(s['cuda_graph'], compile)}, {steps} steps")
        for col in ("", "median ms", "min ms"):
            t.add_column(col, justify="right")
        t.add_row("per step", f"{s['per_step_ms']:.2f}", f"{s['denoise_min_ms'] / steps:.2f}")
        t.add_row("denoising loop", f"{s['denoise_ms']:.1f}", f"{s['denoise_min_ms']:.1f}")
        t.add_row("end to end", f"{s['end_to_end_ms']:.1f}", f"{s['end_to_end_min_ms']:.1f}")
        console.print(t)
        console.print(f"warm-up {warmup}, repeats {repeats}")
