from __future__ import annotations

from pathlib import Path

import typer

from trtkit.cli._common import console

# The demo model has seeded random weights: its image shows that the pipeline runs, not a picture.
NOISE = "  (noise: the demo model has random weights, so the image shows the pipeline ran, not a picture)"


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        workdir: Path = typer.Option(Path("trtkit-demo"), "--workdir", "-o", help="Where the demo writes its files."),
        seed: int = typer.Option(0, "--seed", help="Seed of the tiny model's random weights and of the image."),
        # a plain string checked by run_demo, not a typer choice: a bad name is then trtkit's one-line error
        # (click's usage errors print three)
        model: str = typer.Option("unet", "--model", "-m", metavar="[unet|flux]",
                                  help="unet: a tiny SDXL-architecture pipeline; flux: a tiny "
                                       "guidance-distilled FLUX.1-dev-architecture one."),
    ) -> None:
        """Run every stage on an embedded tiny SDXL (or FLUX) model: no download, no GPU needed."""
        import time

        from trtkit.demo import DemoConfig, run_demo

        colors = {"done": "green", "skipped": "yellow", "failed": "red"}

        def show(r) -> None:  # type: ignore[no-untyped-def]
            console.print(f"[{colors[r.status]}]{r.status:>7}[/] {r.name:<10} {r.seconds:6.1f} s  {r.message}")
            for f in r.files:
                console.print(f"{'':>26}-> {f}" + (NOISE if Path(f).suffix == ".png" else ""))

        t0 = time.perf_counter()
        run_demo(DemoConfig(workdir=workdir, seed=seed, model=model), on_stage=show)
        console.print(f"demo finished in {time.perf_counter() - t0:.1f} s; files under {workdir}/")
