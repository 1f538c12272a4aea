from __future__ import annotations

from pathlib import Path

import typer

from trtkit.cli._common import console, precision_from_flags, print_json, step_progress


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    def quantize(
        onnx_path: Path = typer.Argument(..., metavar="ONNX", help="An exported (unquantized) ONNX, e.g. from `trtkit export`."),
        int8: bool = typer.Option(False, "--int8", help="INT8 Q/DQ (symmetric, amax/127)."),
        fp8: bool = typer.Option(False, "--fp8", help="FP8 E4M3 Q/DQ (amax/448); attention too at level 4."),
        output: Path = typer.Option(..., "--output", "-o", help="Quantized ONNX to write."),
        calib: Path = typer.Option(None, "--calib", help="Calibration file from `trtkit calibrate` "
                                   "(default: max over a run on the profile's sample inputs)."),
        level: float = typer.Option(None, "--level", help="Quantization level 1, 2, 2.5, 3 or 4 "
                                    "(default 3 for INT8, 4 for FP8; see docs/quantization.md)."),
        exclude: list[str] = typer.Option([], "--exclude", metavar="PATTERN", help="Module-name pattern never quantized "
                                          "(substring, or glob with * ? []); repeatable."),
        include: list[str] = typer.Option([], "--include", metavar="PATTERN", help="Module-name pattern quantized whatever the "
                                          "level or default exclusions; repeatable."),
        attention: bool = typer.Option(None, "--attention/--no-attention",
                                       help="Quantize attention BMMs (default: FP8 at level 4 only)."),
        fp16: bool = typer.Option(True, "--fp16/--no-fp16", help="Convert the rest to strongly typed FP16."),
        profile: str = typer.Option("tiny-256", "--profile", "-p",
                                    help="Sample-input shapes for max calibration (without --calib)."),
        no_default_exclusions: bool = typer.Option(False, "--no-default-exclusions",
                                                   help="Drop the demo's exclusions (conv_in, proj_out, ...)."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Insert INT8/FP8 Q/DQ around linear, conv and attention (NVIDIA demo levels), FP16 elsewhere."""
        from trtkit.graph.coverage import coverage, render_coverage
        from trtkit.graph.qdq import QuantizeConfig
        from trtkit.graph.qdq import quantize as do_quantize

        precision_from_flags(int8, fp8, required=True)
        cfg = QuantizeConfig(onnx_path=onnx_path, output=output, precision="int8" if int8 else "fp8", level=level,
                             calib=calib, include=tuple(include), exclude=tuple(exclude), profile=profile,
                             fp16=fp16, quantize_attention=attention, default_exclusions=not no_default_exclusions)
        with step_progress("quantize") as step:
            step(f"{cfg.precision} Q/DQ" + (f" with {calib.name}" if calib else " (max calibration on a sample run)"))
            r = do_quantize(cfg)
        if as_json:
            print_json(r.to_json())
            return
        console.print(f"wrote {r.path}: {r.summary()} in {r.seconds:.1f} s "
                      f"({r.qdq_pairs} activation Q/DQ pairs; ranges: {r.calibration})")
        render_coverage(coverage(r.path), console)
        for n in r.notes:
            console.print(f"note: {n}")
