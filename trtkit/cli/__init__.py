"""The typer app. Each command module declares its options and calls one library verb.

Nothing heavy is imported here or in the command modules at import time: `trtkit --help` loads no
torch, TensorRT or CUDA (a test proves it).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import typer

from trtkit.cli._common import interrupt_hint, interrupted_message
from trtkit.errors import TrtkitError

# typer >= 0.20 vendors its own click; older releases raise the click package's exceptions.
_CLICK_ERRORS: tuple[type[BaseException], ...] = ()
for _mod in ("typer._click.exceptions", "click.exceptions"):
    try:
        _CLICK_ERRORS += (importlib.import_module(_mod).ClickException,)
    except ImportError:
        pass

app = typer.Typer(
    name="trtkit",
    help="Take diffusion models (SD 1.x/2.x, SDXL) to TensorRT and run them fast.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# One module per verb family; each has `register(app)`.
COMMAND_MODULES = ("demo", "doctor", "profiles", "backend", "export", "calibrate", "quantize", "build", "refit", "inspect",
                   "run")


def _version(value: bool) -> None:
    if value:
        import trtkit

        print(f"trtkit {trtkit.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print trtkit's version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log TensorRT and trtkit details."),
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if debug:
        os.environ["TRTKIT_DEBUG"] = "1"
    if not verbose:
        # The libraries read these on import (later, inside the commands): keep their chatter out.
        for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
            os.environ.setdefault(var, "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


for _name in COMMAND_MODULES:
    importlib.import_module(f"trtkit.cli.{_name}").register(app)


def _fail(message: str, code: int) -> int:
    # Plain print, not rich: one line, never wrapped.
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # --debug is global but users put it anywhere (`trtkit inspect x.plan --debug`): honour it wherever it
    # stands before a `--`, as the root option.
    end = args.index("--") if "--" in args else len(args)
    if "--debug" in args[:end]:
        args = ["--debug"] + [a for a in args[:end] if a != "--debug"] + args[end:]
    debug = "--debug" in args[:1] or os.environ.get("TRTKIT_DEBUG") == "1"
    try:
        interrupt_hint.clear()  # set by the command that runs
        rv = app(args=args, prog_name="trtkit", standalone_mode=False)
        if rv == 130:  # typer turns a KeyboardInterrupt into Exit(130) and returns that code, silently
            return _fail(interrupted_message(), 130)
        return int(rv) if isinstance(rv, int) else 0
    except TrtkitError as e:
        if debug:
            raise
        return _fail(str(e), e.exit_code)
    except typer.Exit as e:
        code = int(getattr(e, "exit_code", 0) or 0)
        return _fail(interrupted_message(), 130) if isinstance(e.__cause__, KeyboardInterrupt) else code
    except _CLICK_ERRORS as e:
        if debug:
            raise
        e.show()  # type: ignore[attr-defined]
        return int(e.exit_code)  # type: ignore[attr-defined]
    except (typer.Abort, KeyboardInterrupt):
        return _fail(interrupted_message(), 130)


def entry() -> None:
    sys.exit(main())
