from __future__ import annotations

from pathlib import Path

import typer

from trtkit.cli._common import (
    check_device,
    check_image_size,
    console,
    err_console,
    on_interrupt,
    precision_from_flags,
)


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate(
        model_dir: Path = typer.Argument(None, metavar="MODEL_DIR", help="A diffusers pipeline folder (optional with "
                                         "--from/--to-modelopt: then only checked against)."),
        prompts: Path = typer.Option(None, "--prompts", help="Prompt file, one per line (default: the built-in one)."),
        num_prompts: int = typer.Option(32, "--num-prompts", help="How many prompts of the file to use."),
        steps: int = typer.Option(30, "--steps", help="Denoising steps per prompt batch (use your inference count)."),
        batch: int = typer.Option(2, "--batch", help="Prompts per pipeline call (one calibration pass)."),
        int8: bool = typer.Option(False, "--int8", help="INT8 ranges (the default)."),
        fp8: bool = typer.Option(False, "--fp8", help="FP8 E4M3 ranges (level 4 by default)."),
        level: float = typer.Option(None, "--level", help="Quantization level 1, 2, 2.5, 3, 4 (default 3 INT8, 4 FP8)."),
        percentile: float = typer.Option(None, "--percentile",
                                         help="Share of the steps (early first) whose ranges are used (default 1.0)."),
        reduction: str = typer.Option(None, "--reduction", help="max, min, mean, min-mean or global-min (default mean for INT8, max for FP8)."),
        smoothquant: bool = typer.Option(None, "--smoothquant/--no-smoothquant",
                                         help="SmoothQuant the INT8 linear layers (default off: see docs/calibration.md)."),
        alpha: float = typer.Option(None, "--alpha",
                                    help="Fixed SmoothQuant alpha, implies --smoothquant (default: searched per layer)."),
        height: int = typer.Option(None, "--height", help="Image height (default: the model's native size)."),
        width: int = typer.Option(None, "--width", help="Image width (default: the model's native size)."),
        guidance_scale: float = typer.Option(None, "--guidance-scale", help="Classifier-free guidance scale "
                                              "(default: the pipeline's)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the latents of each prompt batch."),
        device: str = typer.Option(None, "--device", help="cuda or cpu (default: cuda where there is one)."),
        out: Path = typer.Option(Path("calib.json"), "--output", "-o", help="Calibration file to write."),
        from_modelopt: Path = typer.Option(None, "--from-modelopt", metavar="STATE",
                                           help="Convert a ModelOpt checkpoint (mto.save, or a state dict with "
                                                "*_quantizer._amax) into a calibration file; runs nothing."),
        to_modelopt: Path = typer.Option(None, "--to-modelopt", metavar="CALIB",
                                         help="Convert a calibration file into ModelOpt's quantizer state dict "
                                              "(torch file, -o default modelopt_amax.pt); runs nothing."),
    ) -> None:
        """Calibrate a pipeline's UNet or DiT transformer (FLUX.1, SD3.x) for INT8/FP8: per-step ranges, Percentile Quant, SmoothQuant."""
        if from_modelopt is not None or to_modelopt is not None:
            from trtkit.cli._modelopt import convert

            convert(from_modelopt, to_modelopt, model_dir, out, "fp8" if fp8 else "int8" if int8 else None)
            return
        if model_dir is None:
            from trtkit.errors import TrtkitError

            raise TrtkitError("give the diffusers pipeline folder to calibrate (MODEL_DIR)")
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from trtkit.calibration.calibrate import CalibrateConfig, Recipe
        from trtkit.calibration.calibrate import calibrate as do_calibrate

        precision_from_flags(int8, fp8)
        from trtkit.calibration.calibrate import partial_path

        on_interrupt(lambda: "rerun the same command to resume from the finished prompt batches"
                     if partial_path(out).is_file() else "no prompt batch was finished; nothing to resume")
        check_image_size(height, width)
        check_device(device)
        base = Recipe()
        recipe = Recipe(precision="fp8" if fp8 else "int8", level=level,
                        percentile=base.percentile if percentile is None else percentile,
                        reduction=reduction,
                        smoothquant=smoothquant, alpha=alpha)
        cfg = CalibrateConfig(model_dir=model_dir, out=out, prompts=prompts, num_prompts=num_prompts, steps=steps,
                              batch=batch, recipe=recipe, height=height, width=width,
                              guidance_scale=guidance_scale, seed=seed, device=device)
        with Progress(TextColumn("calibrate"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
                      TimeElapsedColumn(), TextColumn("{task.description}"), console=err_console,
                      transient=True, disable=not err_console.is_terminal) as prog:
            task = prog.add_task("", total=None)

            def progress(done: int, total: int, msg: str) -> None:
                prog.update(task, completed=done, total=total, description=msg[:40])
                if not err_console.is_terminal:
                    err_console.print(f"  calibrate: {done}/{total} prompt batches")

            path = do_calibrate(cfg, progress=progress)
        from trtkit import calibfile

        cal = calibfile.load(path)
        extra = f", SmoothQuant on {len(cal.smooth)} linear layers" if cal.smooth else ""
        console.print(f"wrote {path} ({cal.precision}, level {cal.settings.get('level'):g}, "
                      f"{len(cal.activations)} inputs{extra})")
        from trtkit.calibration.controlnet import calib_path
        from trtkit.exporter_controlnet import controlnet_folders

        for name in controlnet_folders(model_dir):  # a ControlNet pipeline: one file per ControlNet beside it
            cn = calibfile.load(calib_path(path, name))
            console.print(f"wrote {calib_path(path, name)} ({name}: {len(cn.activations)} inputs)")
