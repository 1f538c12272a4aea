"""A plan file -> its layer information: from TensorRT's engine inspector where this machine can run the
engine, else from the `x.layers.json` / `x.json` files `trtkit build` writes beside `x.plan`.

Also the checks that turn bad input into one-line errors: not a plan, a truncated plan, a plan from
another TensorRT version. TensorRT is reached only through `trtkit.backend`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtkit.backend import last_errors
from trtkit.errors import TrtkitError
from trtkit.inspector.layers import EngineLayers, parse_engine_information
from trtkit.inspector.plan_file import (
    PlanHeader,
    _get,
    check_metadata_matches,
    check_version,
    companion_paths,
    read_metadata,
    read_plan_header,
)

if TYPE_CHECKING:  # the TensorRT API as typed by stubs/ (10.13, and TensorRT-RTX via mypy-rtx.ini); never imported
    import tensorrt as trt_api



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
