from __future__ import annotations

import typer

from trtkit.cli._common import console, print_json

BACKEND_HELP = "trt or rtx (default: $TRTKIT_BACKEND, then trt, then rtx)."
JSON_HELP = "Print the report as JSON (what to attach to a bug report)."


def doctor_command(backend: str | None, as_json: bool) -> None:
    """Run the checks; one line each (or JSON), then the summary. Exit 1 when a check failed."""
    from rich.text import Text

    from trtkit.doctor import Check, run_checks

    marks = {"ok": ("ok", "green"), "failed": ("FAILED", "bold red"), "skipped": ("skipped", "yellow")}

    def say(c: Check) -> None:
        if not as_json:  # Text, not markup: details hold brackets (pip install 'trtkit[rtx]')
            label, style = marks[c.status]
            console.print(Text.assemble((f"{label:<8}", style), f"{c.name:<12} {c.detail}"), soft_wrap=True)

    report = run_checks(backend, say=say)
    if as_json:
        print_json(report.to_json())
    else:
        console.print(Text(report.summary, style="green" if report.ok else "bold red"), soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(
        name: str = typer.Option(None, "--backend", "-b", help=BACKEND_HELP),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        """Self-check: build a tiny engine, run it on this GPU, capture it in a CUDA graph, compare with onnxruntime.

        Run this first, and attach `trtkit doctor --json` to bug reports. Checks that cannot run on this machine (no GPU, a GPU the backend does not support) are skipped with the reason; exit status 1 if any check fails.
        """
        doctor_command(name, as_json)
