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
  plan {path, bytes, sha256}, layers {saved, path, reason, shapes}, builder_flags (set besides the
  precision flags, e.g. RTX's REQUIRE_USER_ALLOCATION), cache_key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trtkit
from trtkit._files import write_text_atomic
from trtkit.builder.config import RTX_DEFAULT_TARGETS, BuildConfig
from trtkit.builder.precision import engine_precision, fp16_rest
from trtkit.builder.shapes import ProfileShapes
from trtkit.builder.source import OnnxSource

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


def engine_document(config: BuildConfig, backend: Any, source: OnnxSource, graph: OnnxSource, *,
                    targets: Sequence[str], strongly_typed: bool, precision_flags: list[str],
                    builder_flags: list[str], profiles: Sequence[ProfileShapes], io: dict[str, Any],
                    timing_cache_used: bool, onnx_sha: str, calib_sha: str | None, dims_from: Any,
                    qdq_onnx: dict[str, Any] | None, build_seconds: float, plan: dict[str, Any],
                    layers_path: Path | None, layers_reason: str, shapes: Mapping[str, Sequence[int]],
                    notes: list[str], key: str) -> dict[str, Any]:
    """The `x.json` document of one finished build (keys in the module docstring); `source` is the ONNX
    given, `graph` the one TensorRT parsed (after the Q/DQ pass / FP16 conversion)."""
    return {
        "trtkit_version": trtkit.__version__,
        "backend": {"name": backend.name, "module": backend.trt.__name__, "version": backend.version},
        "target": ({"compute_capabilities": list(targets or RTX_DEFAULT_TARGETS),
                    "default_targets": not targets} if backend.is_rtx else
                   {"gpu": backend.gpu, "compute_capability": ".".join(map(str, backend.compute_capability or ()))}),
        "precision": {"requested": config.precision, "engine": engine_precision(config, source),
                      "fp16_rest": fp16_rest(config, source), "qdq_types": list(graph.qdq_types),
                      "strongly_typed": strongly_typed, "builder_flags": precision_flags},
        "builder_flags": builder_flags,  # set besides the precision flags (RTX: REQUIRE_USER_ALLOCATION)
        "profiles": [p.to_json() for p in profiles],
        "io": io,
        "settings": {"opt_level": config.effective_opt_level, "workspace": config.workspace_bytes,
                     "profiling_verbosity": "DETAILED", "static": config.static,
                     "refittable": config.refittable,
                     "timing_cache": str(config.timing_cache) if timing_cache_used else None,
                     "quant_level": config.quant_level, "shapes": config.shapes, "min_shapes": config.min_shapes,
                     "opt_shapes": config.opt_shapes, "max_shapes": config.max_shapes,
                     "extra": dict(config.extra)},
        "onnx": {"path": str(source.path.resolve()), "sha256": onnx_sha,
                 "files": [p.name for p in (source.path, *source.data_files)], "component": source.component,
                 "scope": source.metadata.get("trtkit.scope"), "dims_from": dims_from},
        "calib": {"path": str(config.calib.resolve()), "sha256": calib_sha} if config.calib else None,
        "qdq_onnx": qdq_onnx,
        "build_seconds": round(build_seconds, 3),
        "plan": plan,
        "layers": {"saved": layers_path is not None, "path": layers_path.name if layers_path else None,
                   "reason": layers_reason or "engine inspector JSON (DETAILED)",
                   "shapes": {k: list(v) for k, v in shapes.items()} if layers_path else None},
        "notes": notes,
        "cache_key": key,
    }


def inspection_shapes(profiles: Sequence[Mapping[str, Any]]) -> dict[str, tuple[int, ...]]:
    """The input shapes the saved layer information is resolved at: profile 0's opt shapes (what a live
    `trtkit inspect` uses too), from the profiles' JSON (`x.json` "profiles", `ProfileShapes.to_json()`).
    Without them the inspector writes -1 for every dynamic dimension and no layer has FLOPs."""
    if not profiles:
        return {}
    shapes = profiles[0].get("shapes") or {}
    return {name: tuple(int(d) for d in rng["opt"]) for name, rng in shapes.items()}


def engine_layers(backend: Any, plan: Any, shapes: Mapping[str, tuple[int, ...]] | None = None) -> tuple[str | None, str]:
    """(engine inspector JSON, "") or (None, why not). Needs a backend that can deserialize here.

    `shapes` (inspection_shapes) resolve the dynamic dimensions through an execution context.
    """
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
        context = _shaped_context(trt, engine, shapes) if shapes else None
        if context is not None:
            inspector.execution_context = context
        text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    except Exception as e:  # a failed inspection must not fail a good build
        log.warning("engine inspector failed: %s", e)
        return None, f"not saved: engine inspector failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return text, ""


def _shaped_context(trt: Any, engine: trt_api.ICudaEngine,
                    shapes: Mapping[str, tuple[int, ...]]) -> trt_api.IExecutionContext:
    """A context with every input shape set, for the inspector only (never enqueued, so USER_MANAGED:
    no activation memory, and allowed for RTX engines built with REQUIRE_USER_ALLOCATION)."""
    strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
    context: trt_api.IExecutionContext | None = (
        engine.create_execution_context(strategy) if strategy is not None else engine.create_execution_context())
    if context is None:
        raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?)")
    for name, shape in shapes.items():
        if hasattr(engine, "is_shape_inference_io") and engine.is_shape_inference_io(name):
            continue  # shape tensors take values, not shapes; the inspector resolves without them
        if not context.set_input_shape(name, shape):
            raise RuntimeError(f"TensorRT refused input shape {'x'.join(map(str, shape))} for {name}")
    return context
