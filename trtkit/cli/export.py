from __future__ import annotations

from pathlib import Path

import typer

from trtkit.cli._common import console, step_progress


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        model_dir: Path = typer.Argument(..., help="A diffusers pipeline folder (or a hub id where a network exists)."),
        component: str = typer.Option("unet", "--component", "-c", help="unet, vae_decoder, text_encoder, text_encoder_2 (CLIP; "
                                       "T5 in a FLUX folder), transformer (FLUX.1 / SD3.x) or text_encoder_3 (SD3's T5)."),
        profile: str = typer.Option("sdxl-1024", "--profile", "-p", help="Shape profile (see `trtkit profiles`)."),
        shapes: str = typer.Option(None, "--shapes", help="trtexec-style overrides, e.g. sample:2x4x128x128."),
        out_dir: Path = typer.Option(Path("onnx"), "--output", "-o", help="Output folder."),
        opset: int = typer.Option(19, "--opset"),
        check: bool = typer.Option(True, "--check/--no-check", help="Compare onnxruntime against torch on the opt shapes."),
        external_data: bool = typer.Option(None, "--external-data/--no-external-data",
                                           help="Weights in a .data file (default: only past 2 GB)."),
    ) -> None:
        """Export one component of a diffusers folder to ONNX, checked against torch."""
        from trtkit.exporter import ExportConfig
        from trtkit.exporter import export as do_export

        cfg = ExportConfig(model_dir=model_dir, component=component, profile=profile, out_dir=out_dir,
                           opset=opset, shapes=shapes, check=check, external_data=external_data)
        with step_progress(f"export {component}") as step:
            r = do_export(cfg, progress=step)
        console.print(f"wrote {r.path}" + (f" (+ {r.external_data.name})" if r.external_data else "")
                      + f" in {r.seconds:.1f} s")
        if r.max_abs_err is not None:
            console.print(f"check vs torch on opt shapes: max abs error {r.max_abs_err:.3g}, "
                          f"max relative error {r.max_rel_err:.3g}")
