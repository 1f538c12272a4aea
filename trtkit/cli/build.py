from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import typer

from trtkit.cli._common import console, err_console, precision_from_flags


def _model_bytes(onnx: Path) -> int:
    """The ONNX with its external data (the FP32 weights, for an unquantized export)."""
    from trtkit.builder.source import read_onnx

    src = read_onnx(onnx)
    return sum(p.stat().st_size for p in (src.path, *src.data_files))


def register(app: typer.Typer) -> None:
    @app.command("build")
    def build(
        onnx: Path = typer.Argument(..., metavar="ONNX", help="The ONNX model (its external data file beside it)."),
        output: Path = typer.Option(None, "--output", "-o", help="The plan to write (default: ONNX name + .plan); "
                                    "metadata goes to the same name + .json."),
        profile: list[str] = typer.Option([], "--profile", "-p", metavar="PROFILE", help="Shape profile (see `trtkit profiles`), once per "
                                          "TensorRT optimization profile; or a shapes string for a fixed one."),
        fp16: bool = typer.Option(False, "--fp16", help="FP16 (with --int8/--fp8, which do it by default: the "
                                  "unquantized rest in FP16)."),
        fp32_rest: bool = typer.Option(False, "--fp32-rest", help="With --int8/--fp8: keep the unquantized rest in FP32."),
        int8: bool = typer.Option(False, "--int8", help="INT8 Q/DQ (needs --calib unless the ONNX has Q/DQ)."),
        fp8: bool = typer.Option(False, "--fp8", help="FP8 Q/DQ (compute capability 8.9 or later)."),
        calib: Path = typer.Option(None, "--calib", help="Calibration file from `trtkit calibrate`."),
        quant_level: float = typer.Option(None, "--quant-level", help="How much the Q/DQ pass quantizes."),
        opt_level: int = typer.Option(None, "--opt-level", min=0, max=5,
                                      help="Builder optimization level 0-5 (default 4 for 8-bit, else 3)."),
        timing_cache: Path = typer.Option(None, "--timing-cache", help="Load/save TensorRT's timing cache here "
                                          "(TensorRT-RTX has none: ignored)."),
        workspace: str = typer.Option(None, "--workspace", help="Workspace memory limit, e.g. 8G or 512M."),
        static: bool = typer.Option(False, "--static", help="Fixed shapes: each profile's opt shapes only."),
        shapes: str = typer.Option(None, "--shapes", help="trtexec-style fixed shapes, e.g. sample:2x4x128x128."),
        min_shapes: str = typer.Option(None, "--min-shapes", help="trtexec-style minimum shapes of a dynamic "
                                        "profile (with --opt-shapes and --max-shapes)."),
        opt_shapes: str = typer.Option(None, "--opt-shapes", help="trtexec-style shapes TensorRT tunes for."),
        max_shapes: str = typer.Option(None, "--max-shapes", help="trtexec-style maximum shapes."),
        backend: str = typer.Option(None, "--backend", help="trt or rtx (default: what is installed)."),
        target_cc: list[str] = typer.Option([], "--target-cc", metavar="CC", help="TensorRT-RTX target compute capability, "
                                            "e.g. 8.9 (repeat for more; default: its portable set)."),
        model_dir: Path = typer.Option(None, "--model-dir", help="The diffusers folder the profiles read sizes from "
                                       "(default: the one recorded at export)."),
        refittable: bool = typer.Option(False, "--refittable", help="Weights can be replaced later without a "
                                        "rebuild (BuilderFlag.REFIT), e.g. by `trtkit refit --lora`."),
        force: bool = typer.Option(False, "--force", help="Rebuild even if an identical build exists."),
        verbose: bool = typer.Option(False, "--verbose", help="TensorRT's log and every parser error."),
    ) -> None:
        """Build a TensorRT (or TensorRT-RTX) engine from an ONNX model, with metadata beside it."""
        from trtkit.builder.build import build as do_build
        from trtkit.builder.config import BuildConfig
        from trtkit.builder.network import ParseError
        from trtkit.builder.progress import quiet_tensorrt_log
        from trtkit.errors import TrtkitError

        precision_from_flags(int8, fp8)
        if fp32_rest and (fp16 or not (int8 or fp8)):
            raise TrtkitError("--fp32-rest goes with --int8 or --fp8, without --fp16")
        precision = "int8" if int8 else "fp8" if fp8 else "fp16" if fp16 else "fp32"
        if verbose:
            logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
            logging.getLogger().setLevel(logging.DEBUG)
        cfg = BuildConfig(
            onnx=onnx, output=output or onnx.with_suffix(".plan"), profiles=tuple(profile), shapes=shapes,
            min_shapes=min_shapes, opt_shapes=opt_shapes, max_shapes=max_shapes, precision=precision,
            fp16_base=False if fp32_rest else (True if fp16 and (int8 or fp8) else None), calib=calib, quant_level=quant_level,
            opt_level=opt_level, timing_cache=timing_cache, workspace=workspace, static=static, backend=backend,
            target_cc=tuple(target_cc), model_dir=model_dir, refittable=refittable, force=force,
            verbose=verbose)
        # TensorRT warns per layer (hundreds of lines for a UNet): counted, shown with --verbose.
        quiet = contextlib.nullcontext(None) if verbose else quiet_tensorrt_log()
        try:
            with quiet as warnings:
                r = do_build(cfg, status=lambda msg: err_console.print(f"  {msg}", markup=False))
        except ParseError as e:
            if verbose or len(e.errors) > 1:
                err_console.print(f"ONNX parser errors ({len(e.errors)}):")
                for line in e.errors if verbose else e.errors[:10]:
                    err_console.print(f"  {line}", markup=False)
            raise
        for note in r.notes:
            console.print(f"note: {note}", markup=False)
        if warnings is not None and warnings.count:
            console.print(f"note: TensorRT logged {warnings.count} warnings ({len(warnings.distinct)} distinct; "
                          "--verbose shows the full log):", markup=False)
            for line in warnings.summary():
                console.print(f"  {line}", markup=False)
        if r.cached:
            console.print(f"up to date: {r.plan} (built earlier in {r.build_seconds:.1f} s); --force rebuilds")
            return
        size = r.plan.stat().st_size / 2**20
        console.print(f"built {r.plan} ({size:.1f} MiB, {r.precision}, {r.backend}, profiles "
                      f"{', '.join(r.profiles) or 'static'}) in {r.build_seconds:.1f} s")
        if r.precision in ("int8", "fp8") and r.plan.stat().st_size > _model_bytes(onnx):
            console.print("note: the plan is larger than the ONNX: it holds compiled kernels besides the "
                          "weights, and an 8-bit plan has both the 8-bit kernels and the FP16 ones for the rest; "
                          "for a small model the kernels outweigh the weights 8-bit saves (docs/building.md)")
        console.print(f"metadata {r.metadata}" + (f", layers {r.layers}" if r.layers else ""))
