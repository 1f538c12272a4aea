"""The engine's metadata file (`x.json` beside `x.plan`), the build cache key, and the engine
inspector's layer JSON (`x.layers.json`) where the backend can deserialize the plan.

`x.json` is what `trtkit inspect` and the runtime read; its keys:
  format ("trtkit-engine"), version, trtkit_version, backend {name, module, version},
  target {gpu | compute_capabilities}, precision {requested, engine (what it runs in: the Q/DQ type of
  a pre-quantized ONNX built without --int8/--fp8), fp16_rest, qdq_types, strongly_typed, builder_flags}, profiles [{name, shapes: {input: {min, opt, max}}}], io {inputs, outputs:
  [{name, shape, dtype}]}, settings {opt_level, workspace, timing_cache, static, ...},
  onnx {path, sha256, files, component, dims_from}, calib {path, sha256} | null,
  qdq_onnx {path (beside the plan), sha256, files} | null (the graph the build's Q/DQ pass made and
  TensorRT parsed, kept as `<plan stem>.qdq.onnx`), build_seconds,
  plan {path, bytes, sha256}, layers {saved, path, reason}, cache_key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtkit._files import write_text_atomic

if TYPE_CHECKING:  # the TensorRT 10 API as typed by stubs/ (never imported at run time)
    import tensorrt as trt_api

log = logging.getLogger(__name__)

FORMAT = "trtkit-engine"
VERSION = 1


def cache_key(material: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that decides the plan's bytes."""
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def read_metadata(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else None


def is_cache_hit(plan: Path, meta_path: Path, key: str) -> bool:
    doc = read_metadata(meta_path)
    if doc is None or doc.get("cache_key") != key or not plan.is_file():
        return False
    return plan.stat().st_size == doc.get("plan", {}).get("bytes")


def write_metadata(path: Path, doc: dict[str, Any]) -> Path:
    doc = {"format": FORMAT, "version": VERSION, **doc}
    text = json.dumps(doc, indent=2, default=str)
    # Shapes on one line each ([2, 4, 32, 32]), so the file stays readable.
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(re.split(r",\s*", m.group(1))) + "]", text)
    return write_text_atomic(path, text + "\n")


_NUMBER_LIST = re.compile(r"\[\s+(-?\d+(?:,\s+-?\d+)*)\s+\]")


def engine_layers(backend: Any, plan: Any) -> tuple[str | None, str]:
    """(engine inspector JSON, "") or (None, why not). Needs a backend that can deserialize here."""
    if not backend.can_run:
        return None, f"not saved: {backend.trt.__name__} cannot deserialize on this machine ({backend.why_not_run})"
    trt = backend.trt
    if not hasattr(trt, "LayerInformationFormat"):
        return None, f"not saved: {trt.__name__} has no engine inspector"
    try:
        runtime: trt_api.Runtime = trt.Runtime(backend.logger)
        engine: trt_api.ICudaEngine | None = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            return None, "not saved: the plan did not deserialize on this GPU"
        inspector: trt_api.EngineInspector = engine.create_engine_inspector()
        text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    except Exception as e:  # a failed inspection must not fail a good build
        log.warning("engine inspector failed: %s", e)
        return None, f"not saved: engine inspector failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return text, ""
