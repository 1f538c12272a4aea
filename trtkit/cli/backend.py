from __future__ import annotations

import typer

from trtkit.cli._common import console, print_json


def register(app: typer.Typer) -> None:
    @app.command("backend")
    def backend(
        name: str = typer.Option(None, "--backend", "-b", help="trt or rtx (default: $TRTKIT_BACKEND, then trt, then rtx)."),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
        check: bool = typer.Option(False, "--check", help="Run `trtkit doctor`: build, run and check a tiny engine."),
    ) -> None:
        """Report the TensorRT backend: version, strong typing, precision flags, whether engines can run here."""
        from trtkit.backend import load_backend

        if check:
            from trtkit.cli.doctor import doctor_command

            doctor_command(name, as_json)
            return

        info = load_backend(name).describe()
        if as_json:
            print_json(info)
            return
        for k, v in info.items():
            console.print(f"{k:>20}: {v}")
