"""trtkit: diffusion models to TensorRT, fast.

The top level stays light: `import trtkit` loads no TensorRT, torch or CUDA. The verbs are
handed on lazily, so `trtkit.export(...)` imports torch only when it is called.
"""

from __future__ import annotations

import importlib
from typing import Any

from trtkit.errors import TrtkitError

__version__ = "0.1.0"

# name -> "module:attribute"; resolved on first access (PEP 562).
_LAZY = {
    "export": "trtkit.exporter:export",
    "ExportConfig": "trtkit.exporter:ExportConfig",
    "quantize": "trtkit.graph.qdq:quantize",
    "QuantizeConfig": "trtkit.graph.qdq:QuantizeConfig",
    "calibrate": "trtkit.calibration.calibrate:calibrate",
    "CalibrateConfig": "trtkit.calibration.calibrate:CalibrateConfig",
    "build": "trtkit.builder.build:build",
    "BuildConfig": "trtkit.builder.config:BuildConfig",
    "inspect": "trtkit.inspector.report:inspect",
    "accelerate": "trtkit.runtime.accelerate:accelerate",
    "load_backend": "trtkit.backend:load_backend",
    "get_profile": "trtkit.profiles:get_profile",
}

__all__ = ["TrtkitError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'trtkit' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
