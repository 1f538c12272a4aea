"""The only module that imports TensorRT: `tensorrt` (10.x / 11.x) or `tensorrt_rtx`.

Everything version-dependent is found by feature detection (`hasattr`), never by stored enum
integers, which changed between TensorRT 10 and 11.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from trtkit.errors import TrtkitError

log = logging.getLogger("trtkit.tensorrt")

BACKENDS = {"trt": "tensorrt", "rtx": "tensorrt_rtx"}
INSTALL_HINT = ("install one: pip install 'trtkit[rtx]' (TensorRT-RTX, builds on the CPU) or "
                "pip install 'trtkit[trt]' --extra-index-url https://pypi.nvidia.com (full TensorRT 10/11)")
PRECISION_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4")
# Compute capabilities TensorRT-RTX runs any of its plans on (its own refusal text: "8.0 8.6 8.9 12.0 12.1
# >12.0"). No Hopper/SM90, SM100, nor Jetson Orin (8.7). Turing (7.5) runs only plans built for it: rtx_runs_on.
RTX_RUNNABLE = {(8, 0), (8, 6), (8, 9), (12, 0), (12, 1)}
RTX_TURING = (7, 5)


@dataclass(frozen=True)
class Backend:
    """A loaded TensorRT flavour and what it can do on this machine."""

    name: str  # "trt" or "rtx"
    trt: Any = field(repr=False)  # the imported module
    version: str
    strongly_typed_only: bool
    precision_flags: tuple[str, ...]
    gpu: str | None  # "NVIDIA H100 80GB HBM3 (sm_90)" or None
    compute_capability: tuple[int, int] | None
    can_run: bool
    why_not_run: str = ""

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def is_rtx(self) -> bool:
        return self.name == "rtx"

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name, "module": self.trt.__name__, "version": self.version,
            "strongly_typed_only": self.strongly_typed_only, "precision_flags": list(self.precision_flags),
            "gpu": self.gpu, "can_run_engines": self.can_run, "why_not": self.why_not_run,
        }

    @property
    def logger(self) -> Any:
        return _logger(self.trt)


def _is_real(module_name: str) -> bool:
    """True if the module is installed and is not an empty namespace package (tensorrt-stubs)."""
    spec = importlib.util.find_spec(module_name)
    return spec is not None and spec.origin not in (None, "namespace")


def available() -> list[str]:
    return [k for k, m in BACKENDS.items() if _is_real(m)]


def gpu_info() -> tuple[str | None, tuple[int, int] | None, str]:
    """(name, compute capability, reason if none) of device 0 via the CUDA driver API (cuda-python)."""
    try:
        from cuda.bindings import driver as cu
    except ImportError:
        try:
            from cuda import cuda as cu  # cuda-python < 12.6
        except ImportError:
            return None, None, "cuda-python is not installed"
    try:
        err, = cu.cuInit(0)
    except Exception:  # no driver library at all (cuda-python raises its own loader error)
        return None, None, "no CUDA driver"
    if int(err) != 0:
        return None, None, "no CUDA driver or GPU"
    err, n = cu.cuDeviceGetCount()
    if int(err) != 0 or n == 0:
        return None, None, "no CUDA GPU"
    err, dev = cu.cuDeviceGet(0)
    err, raw = cu.cuDeviceGetName(64, dev)
    name = raw.split(b"\0")[0].decode()
    attr = cu.CUdevice_attribute
    _, major = cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    _, minor = cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    return f"{name} (sm_{major}{minor})", (major, minor), ""


@cache
def load_backend(name: str | None = None) -> Backend:
    """Load the backend named by `name`, else $TRTKIT_BACKEND, else tensorrt, else tensorrt_rtx."""
    name = name or os.environ.get("TRTKIT_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise TrtkitError(f"unknown backend {name!r}; expected trt or rtx")
    order = [name] if name else ["trt", "rtx"]
    for key in order:
        mod_name = BACKENDS[key]
        if not _is_real(mod_name):
            continue
        try:
            mod = importlib.import_module(mod_name)
        except (ImportError, OSError) as e:  # a wheel whose shared libraries fail to load
            if name:
                raise TrtkitError(f"{mod_name} is installed but does not load: {e}") from e
            continue
        if not hasattr(mod, "Builder") and not hasattr(mod, "Runtime"):
            if name:
                raise TrtkitError(f"{mod_name} is installed but has no Builder/Runtime (a stub package?)")
            continue
        return _describe(key, mod)
    if name:
        raise TrtkitError(f"backend {name} ({BACKENDS[name]}) is not installed; {INSTALL_HINT}")
    raise TrtkitError(f"no TensorRT backend is installed; {INSTALL_HINT}")


def rtx_runs_on(cc: tuple[int, int] | None, plan_targets: list[str] | None = None) -> tuple[bool, str]:
    """(whether TensorRT-RTX can run a plan on a GPU of compute capability `cc`, why not).

    `plan_targets`: the plan's `target.compute_capabilities` from its metadata ("7.5", "8.9", ...), or
    None for "any plan". Turing runs only plans built with --target-cc 7.5, which None cannot promise.
    """
    if cc is None:
        return False, "no CUDA GPU"
    name = f"{cc[0]}.{cc[1]}"
    if cc == RTX_TURING:
        if plan_targets is not None and name in plan_targets:
            return True, ""
        return False, ("TensorRT-RTX runs on Turing (7.5) only plans built for it (trtkit build --backend rtx "
                       "--target-cc 7.5)")
    if cc in RTX_RUNNABLE or cc[0] > 12:
        return True, ""
    return False, f"TensorRT-RTX does not run on compute capability {name} (it runs on 8.0, 8.6, 8.9, 12.x)"


def _describe(key: str, mod: Any) -> Backend:
    flags = tuple(f for f in PRECISION_FLAGS if hasattr(getattr(mod, "BuilderFlag", None), f))
    version = getattr(mod, "__version__", "0")
    gpu, cc, why = gpu_info()
    can_run, reason = gpu is not None, why
    if can_run and key == "rtx":
        can_run, reason = rtx_runs_on(cc)
    if not hasattr(mod, "Runtime"):
        can_run, reason = False, f"{mod.__name__} has no Runtime"
    return Backend(name=key, trt=mod, version=version, strongly_typed_only=not flags,
                   precision_flags=flags, gpu=gpu, compute_capability=cc, can_run=can_run,
                   why_not_run=reason if not can_run else "")


_LOGGERS: dict[str, Any] = {}


def keep_message(level: int, info_wanted: bool) -> bool:
    """Which TensorRT messages reach Python logging: never VERBOSE (thousands per build, each taking the
    GIL from a builder thread), INFO only when asked for (--verbose), WARNING and above always."""
    return level >= logging.WARNING or (level == logging.INFO and info_wanted)


def last_errors(messages: list[tuple[int, str]], n: int = 1) -> list[str]:
    """The last `n` ERROR-or-worse messages (first line each) of a logger's `messages`, oldest first:
    what an error report quotes, never the INFO/WARNING noise around it."""
    errors = [m.splitlines()[0] if m else m for lvl, m in messages if lvl >= logging.ERROR]
    return errors[-n:] if n > 0 else []


def _logger(trt: Any) -> Any:
    """One ILogger per module and process: TensorRT keeps the first one it is given."""
    if trt.__name__ in _LOGGERS:
        return _LOGGERS[trt.__name__]
    sev = trt.ILogger.Severity
    levels = {sev.INTERNAL_ERROR: logging.CRITICAL, sev.ERROR: logging.ERROR, sev.WARNING: logging.WARNING,
              sev.INFO: logging.INFO, sev.VERBOSE: logging.DEBUG}

    class _PyLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[int, str]] = []
            self.interrupted = threading.Event()

        def log(self, severity: Any, msg: str) -> None:
            try:
                level = levels.get(severity, logging.INFO)
                if not keep_message(level, log.isEnabledFor(logging.INFO)):
                    return
                self.messages.append((level, msg))
                del self.messages[:-2000]
                log.log(level, msg)
            except KeyboardInterrupt:
                # TensorRT catches what a callback raises and goes on ("Exception caught in log()"):
                # keep the Ctrl-C for the caller, which calls reraise_interrupt() once TensorRT returns.
                self.interrupted.set()

        def reraise_interrupt(self) -> None:
            if self.interrupted.is_set():
                self.interrupted.clear()
                raise KeyboardInterrupt

    _LOGGERS[trt.__name__] = _PyLogger()
    return _LOGGERS[trt.__name__]
