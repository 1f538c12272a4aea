"""A plan file -> its layer information: from TensorRT's engine inspector where this machine can run the
engine, else from the `x.layers.json` / `x.json` files `trtkit build` writes beside `x.plan`.

Also the checks that turn bad input into one-line errors: not a plan, a truncated plan, a plan from
another TensorRT version. TensorRT is reached only through `trtkit.backend`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtkit.backend import last_errors
from trtkit.errors import TrtkitError
from trtkit.inspector.layers import EngineLayers, parse_engine_information

if TYPE_CHECKING:  # the TensorRT API as typed by stubs/ (10.13, and TensorRT-RTX via mypy-rtx.ini); never imported
    import tensorrt as trt_api

# First four bytes of a serialized engine. "ftrt": full TensorRT plans (what torch-tensorrt and others test
# for); "vtrt": TensorRT-RTX 1.x plans (seen on plans built here with tensorrt_rtx 1.7.1). Header layout
# checked on RTX plans only: uint64 total size at byte 16, version major/minor/patch/build at bytes 24..27.
PLAN_MAGICS = {b"ftrt": "trt", b"ptrt": "trt", b"vtrt": "rtx"}
RTX_HEADER = 64


@dataclass(frozen=True)
class PlanHeader:
    flavour: str  # "trt" | "rtx"
    size_field: int | None  # total plan size written in the header (RTX), else None
    version: tuple[int, int, int, int] | None  # builder version written in the header (RTX), else None

    @property
    def version_str(self) -> str | None:
        return ".".join(str(v) for v in self.version) if self.version else None


def companion_paths(plan: Path) -> tuple[Path, Path]:
    """x.plan -> (x.json metadata, x.layers.json layer information)."""
    return plan.with_suffix(".json"), plan.with_suffix(".layers.json")


def read_plan_header(plan: Path) -> PlanHeader:
    """Check the file is a TensorRT plan and whole; one-line TrtkitError otherwise."""
    if not plan.is_file():
        raise TrtkitError(f"engine file {plan} does not exist")
    size = plan.stat().st_size
    with open(plan, "rb") as f:
        head = f.read(RTX_HEADER)
    if size == 0:
        raise TrtkitError(f"{plan} is empty, not a TensorRT plan")
    flavour = PLAN_MAGICS.get(head[:4])
    if flavour is None:
        what = _sniff(head)
        raise TrtkitError(f"{plan} is not a TensorRT plan ({what}); pass an engine written by `trtkit build`"
                          " or an .onnx model")
    if size < 32:
        raise TrtkitError(f"{plan} is truncated: {size} bytes, shorter than a plan header")
    size_field = version = None
    if flavour == "rtx" and len(head) >= 28:
        size_field = struct.unpack_from("<Q", head, 16)[0]
        version = tuple(head[24:28])
        if size_field and size < size_field:
            raise TrtkitError(f"{plan} is truncated: {size} bytes of the {size_field} its header announces")
    return PlanHeader(flavour, size_field, version)  # type: ignore[arg-type]


def _sniff(head: bytes) -> str:
    if head.lstrip()[:1] in (b"{", b"["):
        return "it is JSON text"
    if len(head) > 1 and head[0] == 0x08 and 3 <= head[1] <= 15:  # protobuf field 1 = ONNX ir_version
        return "it looks like an ONNX model; run `trtkit inspect` on the .onnx path"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head[:32]):
        return "it is a text file"
    return f"unknown header {head[:4]!r}"


def read_metadata(plan: Path) -> dict[str, Any] | None:
    meta_path, _ = companion_paths(plan)
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrtkitError(f"{meta_path}: engine metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise TrtkitError(f"{meta_path}: engine metadata is not a JSON object")
    return meta


def _get(meta: dict[str, Any] | None, *paths: str) -> Any:
    """First present value among dotted key paths (the metadata file's keys are the builder room's)."""
    if not meta:
        return None
    for p in paths:
        cur: Any = meta
        for k in p.split("."):
            if not isinstance(cur, dict) or k not in cur:
                cur = None
                break
            cur = cur[k]
        if cur not in (None, ""):
            return cur
    return None


def meta_backend(meta: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(backend "trt"/"rtx", TensorRT version) that built the plan, per its metadata."""
    name = _get(meta, "backend.name", "backend", "versions.backend")
    if isinstance(name, dict):
        name = name.get("name")
    version = _get(meta, "backend.version", "versions.tensorrt", "versions.tensorrt_rtx", "tensorrt_version",
                   "trt_version", "versions.backend_version", "backend_version")
    if isinstance(name, str):
        name = {"tensorrt": "trt", "tensorrt_rtx": "rtx"}.get(name, name)
    return (name if isinstance(name, str) else None), (str(version) if version is not None else None)


def meta_onnx(meta: dict[str, Any] | None, plan: Path) -> Path | None:
    """The ONNX to cross-check against: the Q/DQ ONNX the build kept beside the plan, else its source."""
    kept = _get(meta, "qdq_onnx.path")
    if isinstance(kept, str) and (plan.parent / kept).is_file():
        return plan.parent / kept
    p = _get(meta, "onnx.path", "onnx", "onnx_path")
    if isinstance(p, dict):
        p = p.get("path")
    if not isinstance(p, str):
        return None
    path = Path(p)
    if not path.is_absolute():
        path = (plan.parent / path)
    return path if path.is_file() else None


def check_onnx_for(onnx: Path, meta: dict[str, Any] | None, plan: Path) -> str | None:
    """`--onnx` against what the metadata knows: another model (other inputs) is refused; the same
    interface with other bytes (a separate export or quantization) gets a note. None when it matches."""
    from trtkit.builder.source import read_onnx

    sums = {v for v in (_get(meta, "onnx.sha256"), _get(meta, "qdq_onnx.sha256")) if isinstance(v, str)}
    if not sums:
        return None  # no metadata: nothing to check against
    src = read_onnx(onnx)
    inputs = _get(meta, "io.inputs")
    names = [str(t.get("name")) for t in inputs if isinstance(t, dict)] if isinstance(inputs, list) else []
    if names and sorted(names) != sorted(src.inputs):
        raise TrtkitError(f"--onnx {onnx.name} is not the model {plan.name} was built from: its inputs are "
                          f"{', '.join(src.inputs) or 'none'}, the engine's {', '.join(names)}; omit --onnx to "
                          "use the ONNX recorded in the metadata")
    if src.sha256() in sums:
        return None
    return (f"--onnx {onnx.name} is not the file {plan.name} was built from (its sha256 differs from the "
            "metadata's): the cross-check assumes it has the same graph and Q/DQ placement")


def _same_release(a: str, b: str, rtx: bool) -> bool:
    """Plans load only on the TensorRT that built them (major.minor.patch for TensorRT, major.minor for RTX)."""
    pa, pb = a.split("."), b.split(".")
    n = 2 if rtx else 3
    return pa[:n] == pb[:n]


def check_version(plan: Path, header: PlanHeader, meta: dict[str, Any] | None, backend: Any | None) -> None:
    """Raise when the plan was built by another TensorRT than the installed one of the same flavour."""
    built_by, built_version = meta_backend(meta)
    if header.version_str and header.flavour == "rtx":
        built_by, built_version = "rtx", header.version_str
    if backend is None or built_version is None:
        return
    flavour = built_by or header.flavour
    if flavour != backend.name:
        return  # a TensorRT plan and an RTX runtime (or the reverse): reported as "cannot deserialize" below
    compat = bool(_get(meta, "build.version_compatible", "version_compatible", "settings.version_compatible"))
    if compat and backend.major >= int(built_version.split(".")[0]):
        return
    if not _same_release(built_version, backend.version, backend.is_rtx):
        label = "TensorRT-RTX" if backend.is_rtx else "TensorRT"
        raise TrtkitError(f"{plan} was built with {label} {built_version} but {label} {backend.version} is "
                          "installed; rebuild it with `trtkit build` or inspect it where that version is installed")


def check_metadata_matches(plan: Path, meta: dict[str, Any] | None) -> None:
    size = _get(meta, "plan.bytes", "plan.size", "plan_size", "plan_bytes")
    actual = plan.stat().st_size
    if isinstance(size, int) and size != actual:
        what = "truncated" if actual < size else "not the plan its metadata describes"
        raise TrtkitError(f"{plan} is {what}: {actual} bytes, its metadata records {size}")


@dataclass
class EngineSource:
    """What could be read about one plan, and from where."""

    plan: Path
    header: PlanHeader
    metadata: dict[str, Any] | None
    layers: EngineLayers | None
    source: str  # "inspector" | "saved" | "none"
    notes: list[str] = field(default_factory=list)  # what could not be read, and why
    timings_ms: dict[str, float] | None = None  # per-layer mean times from --profile-layers
    backend: str | None = None


def _try_backend(name: str | None) -> tuple[Any | None, str]:
    from trtkit.backend import load_backend

    try:
        return load_backend(name), ""
    except TrtkitError as e:
        if name:
            raise
        return None, str(e)


class NotDeserialized(TrtkitError):
    """The installed backend could not load the plan (another GPU model, another version, corrupt, or a
    version-compatible plan whose host code inspect never runs): load_engine falls back to the saved files."""


def plan_targets(meta: dict[str, Any] | None) -> list[str] | None:
    """The compute capabilities an RTX plan was built for ("7.5", "8.9", ...), per its metadata; None if unknown."""
    targets = _get(meta, "target.compute_capabilities")
    return [str(t) for t in targets] if isinstance(targets, list) else None


def runs_here(be: Any, header: PlanHeader, meta: dict[str, Any] | None) -> tuple[bool, str]:
    """(whether `be` can deserialize this plan on this machine, why not): the backend's own verdict, except that
    TensorRT-RTX on Turing runs the plans built for 7.5 (backend.rtx_runs_on)."""
    from trtkit.backend import rtx_runs_on

    if header.flavour != be.name:
        label = "TensorRT-RTX" if header.flavour == "rtx" else "TensorRT"
        return False, f"it is a {label} plan and the loaded backend is {be.name}; pass --backend {header.flavour}"
    if be.is_rtx and be.gpu is not None and hasattr(be.trt, "Runtime"):
        return rtx_runs_on(be.compute_capability, plan_targets(meta))
    return bool(be.can_run), be.why_not_run


def load_engine(plan: str | Path, backend: str | None = None, profile_layers: bool = False,
                runs: int = 10, from_files: bool = False) -> EngineSource:
    """`from_files`: read the saved layer information even where this machine could deserialize the plan.

    Where the plan does not deserialize here (NotDeserialized), the saved files are read instead, with a note;
    it stays an error with --profile-layers (which must run the engine) or when nothing was saved beside it.
    """
    plan = Path(plan)
    if from_files and profile_layers:
        raise TrtkitError("--profile-layers runs the engine; it cannot be combined with --from-files")
    header = read_plan_header(plan)
    meta = read_metadata(plan)
    check_metadata_matches(plan, meta)
    be, why_none = _try_backend(backend)
    check_version(plan, header, meta, be)
    notes: list[str] = []
    can_run, why_not = runs_here(be, header, meta) if be is not None else (False, why_none)
    if from_files:
        why = "--from-files"
    elif can_run and be is not None:
        try:
            layers, timings = _from_inspector(plan, be, profile_layers, runs)
            return EngineSource(plan, header, meta, layers, "inspector", notes, timings, be.name)
        except NotDeserialized as e:
            if profile_layers or (meta is None and not companion_paths(plan)[1].is_file()):
                raise  # nothing saved to fall back on (or the engine must run): the error is the answer
            why = f"{e}; `trtkit inspect --from-files` skips this attempt"
    else:
        why = why_not
    if profile_layers:
        raise TrtkitError(f"--profile-layers needs TensorRT and a GPU that can run this engine: {why}")
    notes.append(f"engine not deserialized ({why}); read the files `trtkit build` saved beside it")
    if meta is None:
        notes.append(f"no metadata file {plan.with_suffix('.json').name}: versions, precision and profiles unknown")
    _, layers_path = companion_paths(plan)
    if layers_path.is_file():
        try:
            layers = parse_engine_information(layers_path.read_text())
        except TrtkitError as e:
            raise TrtkitError(f"{layers_path}: {e}") from e
        if layers.verbosity == "layer_names_only":
            notes.append("layer information has names only (engine built at LAYER_NAMES_ONLY verbosity): no "
                         "precisions, formats or tactics; rebuild with DETAILED profiling verbosity")
        return EngineSource(plan, header, meta, layers, "saved", notes, None, be.name if be else None)
    saved = _get(meta, "layers.saved", "layers_saved")
    recorded = _get(meta, "layers.reason", "layers_reason") if saved is False else None
    reason = (f"the build recorded: {recorded}" if recorded else
              "the build could not deserialize the engine to save it" if saved is False else
              f"no {layers_path.name} beside the plan")
    notes.append(f"no per-layer information, so no layer precisions, fusion or Q/DQ cross-check: {reason}")
    return EngineSource(plan, header, meta, None, "none", notes, None, be.name if be else None)


def _dims(d: trt_api.Dims) -> tuple[int, ...]:
    # Dims is indexable, not iterable, in the stubs (the binding iterates through __getitem__).
    return tuple(int(d[i]) for i in range(len(d)))


def _opt_shapes(engine: trt_api.ICudaEngine, trt: Any) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
            continue
        if hasattr(engine, "is_shape_inference_io") and engine.is_shape_inference_io(name):
            continue
        _, opt, _ = engine.get_tensor_profile_shape(name, 0)
        shapes[name] = _dims(opt)
    return shapes


def _from_inspector(plan: Path, be: Any, profile_layers: bool, runs: int) -> tuple[EngineLayers, Any]:
    trt = be.trt
    runtime: trt_api.Runtime = trt.Runtime(be.logger)
    runtime.engine_host_code_allowed = False  # never run code shipped inside a plan we only inspect
    data = plan.read_bytes()
    if hasattr(runtime, "get_engine_validity"):  # TensorRT-RTX: says why before trying
        validity, diag = runtime.get_engine_validity(data)
        if validity == trt.EngineValidity.INVALID:
            flags = [n for n, v in trt.EngineInvalidityDiagnostics.__members__.items() if int(diag) & int(v)]
            raise NotDeserialized(f"{plan} cannot be loaded by TensorRT-RTX {be.version}: "
                                  f"{', '.join(flags).lower().replace('_', ' ') or 'invalid engine'}")
    engine: trt_api.ICudaEngine | None = runtime.deserialize_cuda_engine(data)
    if engine is None:
        last = last_errors(be.logger.messages)
        raise NotDeserialized(f"{plan} could not be deserialized by {trt.__name__} {be.version} (truncated, corrupt, "
                              f"version-compatible or built by another version or GPU){': ' + last[0] if last else ''}")
    context = _context(trt, engine, execute=profile_layers)
    for name, shape in _opt_shapes(engine, trt).items():
        if not context.set_input_shape(name, shape):
            raise TrtkitError(f"{plan}: TensorRT refused input {name} at profile 0's opt shape "
                              f"{'x'.join(map(str, shape))}")
    inspector: trt_api.EngineInspector = engine.create_engine_inspector()
    inspector.execution_context = context  # resolves dynamic dimensions and formats
    info = parse_engine_information(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    timings = _profile(engine, context, trt, runs) if profile_layers else None
    return info, timings


def _context(trt: Any, engine: trt_api.ICudaEngine, execute: bool) -> trt_api.IExecutionContext:
    """An execution context, checked. Inspection only: USER_MANAGED (no activation memory is allocated, and
    RTX engines built with REQUIRE_USER_ALLOCATION accept it); for --profile-layers TensorRT's default
    (STATIC: it allocates what the runs need)."""
    strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
    context: trt_api.IExecutionContext | None
    if execute or strategy is None:
        context = engine.create_execution_context()
    else:
        context = engine.create_execution_context(strategy)
    if context is None:
        raise TrtkitError("TensorRT could not create an execution context (out of GPU memory?)")
    return context


def _profile(engine: trt_api.ICudaEngine, context: trt_api.IExecutionContext, trt: Any, runs: int) -> dict[str, float]:
    """Mean time per layer over `runs` executions at the opt shapes (IProfiler), inputs zeroed."""
    from cuda.bindings import driver as cu

    if not hasattr(trt, "IProfiler"):
        raise TrtkitError(f"{trt.__name__} has no IProfiler: --profile-layers is not available with it")

    def ok(res: Any) -> Any:
        err = res[0] if isinstance(res, tuple) else res
        if int(err) != 0:
            raise TrtkitError(f"CUDA error {err} while profiling layers")
        return res[1] if isinstance(res, tuple) and len(res) > 1 else None

    times: dict[str, list[float]] = {}

    class _Profiler(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            times.setdefault(layer_name, []).append(ms)

    ok(cu.cuInit(0))
    device = ok(cu.cuDeviceGet(0))
    ok(cu.cuCtxSetCurrent(ok(cu.cuDevicePrimaryCtxRetain(device))))  # the context TensorRT's runtime uses
    buffers = []
    try:
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = _dims(context.get_tensor_shape(name))
            n = 1
            for d in shape:
                n *= max(int(d), 1)
            nbytes = max(n * _itemsize(trt, engine.get_tensor_dtype(name)), 256)
            ptr = ok(cu.cuMemAlloc(nbytes))
            ok(cu.cuMemsetD8(ptr, 0, nbytes))
            buffers.append(ptr)
            context.set_tensor_address(name, int(ptr))
        stream = ok(cu.cuStreamCreate(0))
        context.execute_async_v3(int(stream))  # warm-up, not timed
        ok(cu.cuStreamSynchronize(stream))
        context.profiler = _Profiler()
        for _ in range(runs):
            if not context.execute_async_v3(int(stream)):
                raise TrtkitError("execute_async_v3 failed while profiling layers")
            ok(cu.cuStreamSynchronize(stream))
        ok(cu.cuStreamDestroy(stream))
    finally:
        for ptr in buffers:
            cu.cuMemFree(ptr)
        cu.cuDevicePrimaryCtxRelease(device)
    return {k: sum(v) / len(v) for k, v in times.items()}


def _itemsize(trt: Any, dtype: Any) -> int:
    if hasattr(trt, "nptype"):
        try:
            import numpy as np

            return int(np.dtype(trt.nptype(dtype)).itemsize)
        except (TypeError, KeyError):
            pass
    return 4
