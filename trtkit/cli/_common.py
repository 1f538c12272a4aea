"""Console, progress and small option helpers shared by the command modules (no heavy imports)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console

from trtkit.errors import TrtkitError

# Off a terminal (logs, CI, pipes) rich would wrap result lines at 80 columns: one line stays one line.
console = Console(highlight=False, soft_wrap=not sys.stdout.isatty())
err_console = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())


@contextlib.contextmanager
def step_progress(title: str) -> Iterator[Callable[[str], None]]:
    """A spinner with a message per step; yields `step(msg)`. Quiet when not on a terminal."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if not sys.stderr.isatty():
        yield lambda msg: err_console.print(f"  {title}: {msg}")
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err_console, transient=True) as prog:
        task = prog.add_task(title)
        yield lambda msg: prog.update(task, description=f"{title}: {msg}")


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def check_image_size(height: int | None, width: int | None) -> None:
    """The pipelines need multiples of 8 (the VAE factor); checked before any model is loaded."""
    for flag, v in (("--height", height), ("--width", width)):
        if v is not None and (v < 8 or v % 8):
            raise TrtkitError(f"height and width must be positive multiples of 8 (pixels, e.g. 512 or 1024), "
                              f"got {flag} {v}")


def check_device(device: str | None) -> None:
    """`--device cuda` on a machine where torch has no CUDA: one line now, not torch's assertion later."""
    if device is None or device == "cpu":
        return
    if device != "cuda" and not device.startswith("cuda:"):
        raise TrtkitError(f"--device must be cpu or cuda, got {device!r}")
    import torch

    if not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None  # type: ignore[attr-defined]
               else "torch finds no CUDA GPU here")
        raise TrtkitError(f"--device {device}: {why}; use --device cpu, or leave --device out "
                          "(cuda where there is one, else cpu)")


def precision_from_flags(int8: bool, fp8: bool, required: bool = False) -> str | None:
    """--int8 / --fp8, with one wording in every command."""
    if int8 and fp8:
        raise TrtkitError("choose one of --int8 and --fp8, not both")
    if required and not (int8 or fp8):
        raise TrtkitError("choose one of --int8 and --fp8")
    return "int8" if int8 else "fp8" if fp8 else None


# What to tell the user after a Ctrl-C, set by the running command (calibrate: how to resume).
interrupt_hint: list[Callable[[], str]] = []


def on_interrupt(hint: Callable[[], str]) -> None:
    interrupt_hint.clear()
    interrupt_hint.append(hint)


def interrupted_message() -> str:
    hint = interrupt_hint[0]() if interrupt_hint else ""
    return "interrupted (Ctrl-C)" + (f"; {hint}" if hint else "")
