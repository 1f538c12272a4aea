"""`trtkit inspect`: Q/DQ coverage of an ONNX model, or what an engine's layers really run in."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(
        path: Path = typer.Argument(..., metavar="PLAN_OR_ONNX", help="An .onnx model (Q/DQ coverage) or an engine plan (layer report)."),
        path2: Path | None = typer.Argument(None, metavar="PLAN_B", help="A second plan: compare the two engines layer by layer."),
        onnx: Path | None = typer.Option(None, "--onnx", help="The ONNX the engine was built from (for the Q/DQ "
                                         "cross-check); default: the path recorded in the engine metadata."),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
        html: Path | None = typer.Option(None, "--html", help="Also write a self-contained HTML page here."),
        profile_layers: bool = typer.Option(False, "--profile-layers",
                                            help="Time each layer over a few runs (TensorRT + GPU only)."),
        backend: str | None = typer.Option(None, "--backend", help="trt or rtx (default: $TRTKIT_BACKEND, "
                                           "else whichever is installed)."),
        from_files: bool = typer.Option(False, "--from-files", help="Read the layer information `trtkit build` "
                                        "saved beside the plan even where this machine could load the engine."),
        layers: bool = typer.Option(True, "--layers/--no-layers", help="List every layer in the terminal."),
    ) -> None:
        """Report Q/DQ coverage (.onnx) or per-layer precision, fusion and the Q/DQ cross-check (plan)."""
        from trtkit.cli._common import console, err_console, print_json
        from trtkit.inspector.report import inspect

        if html is not None:  # checked before the report is built: a folder, a device node, an input
            from trtkit.inspector.html import html_output

            html = html_output(html, path, path2, onnx)
        report = inspect(path, path2, onnx=onnx, backend=backend, profile_layers=profile_layers,
                         from_files=from_files)
        if html is not None:
            from trtkit.inspector.html import write_html

            write_html(report, html)
        if as_json:
            print_json(report.to_json())
        else:
            from trtkit.inspector.render import render

            render(report, console, all_layers=layers)
        if html is not None:
            err_console.print(f"wrote {html}")
