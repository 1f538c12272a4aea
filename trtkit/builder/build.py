"""`build(BuildConfig) -> BuildResult`: ONNX to a TensorRT plan through the network API.

Steps: read the ONNX (no weights), resolve and check the profiles, compute the cache key (a hit
returns at once), prepare the graph for the backend's precision model (FP16 conversion / Q/DQ pass
on strongly typed backends, builder flags on TensorRT 10), parse with `parse_from_file`, build with
a progress monitor, then write the plan atomically, the layer JSON and the metadata file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trtkit
from trtkit._files import (
    atomic_path,
    check_output,
    ensure_writable_dir,
    sha256_files,
    write_bytes_atomic,
    write_text_atomic,
)
from trtkit.builder import metadata as md
from trtkit.builder import precision as pr
from trtkit.builder.config import (
    FP8_DEFAULT_TARGETS,
    BuildConfig,
    fp8_gpu_error,
)
from trtkit.builder.network import add_profiles, network_flags, network_io, parse_onnx, set_rtx_targets
from trtkit.builder.outputs import keep_qdq_onnx, output_lock, plan_identity, qdq_onnx_path
from trtkit.builder.progress import (
    BuildCancelled,
    BuildProgress,
    DropAfterCancel,
    cancel_on_sigint,
    make_monitor,
    progress_display,
)
from trtkit.builder.shapes import ProfileShapes, resolve_profiles
from trtkit.builder.source import OnnxSource, read_onnx
from trtkit.errors import TrtkitError

if TYPE_CHECKING:  # the TensorRT 10 API as typed by stubs/ (never imported at run time)
    import tensorrt as trt_api

log = logging.getLogger(__name__)



@dataclass
class BuildResult:
    plan: Path
    metadata: Path
    layers: Path | None  # the engine inspector JSON, where it could be made
    cached: bool  # True: an identical earlier build was reused
    seconds: float  # this call's wall time
    build_seconds: float  # TensorRT's build time (of the earlier build on a cache hit)
    cache_key: str
    profiles: list[str] = field(default_factory=list)
    precision: str = "fp32"
    backend: str = ""
    notes: list[str] = field(default_factory=list)


def _rtx_targets(config: BuildConfig, source: OnnxSource) -> tuple[str, ...]:
    """RTX targets; FP8 in the graph (asked for, or already in its Q/DQ) needs 8.9 or later."""
    if "fp8" not in source.qdq_types:
        return config.rtx_targets
    low = [t for t in config.target_cc if t != "current" and float(t) < 8.9]
    if low:
        raise TrtkitError(f"{source.path.name} has FP8 Q/DQ, which needs compute capability 8.9 or later; "
                          f"drop --target-cc {' '.join(low)}")
    return config.target_cc or FP8_DEFAULT_TARGETS


def rtx_build_flags(trt: Any) -> list[str]:
    """BuilderFlag names every TensorRT-RTX build sets, where this RTX has them.

    REQUIRE_USER_ALLOCATION (RTX 1.2+): no runtime allocation inside enqueue, so the engine can be captured
    in a CUDA graph (the runtime's default --cuda-graph). Its doc: the build fails for networks whose
    data-dependent shapes need runtime allocation; diffusion models have none.
    """
    return [f for f in ("REQUIRE_USER_ALLOCATION",) if hasattr(trt.BuilderFlag, f)]


def refit_flag(trt: Any) -> str:
    """The BuilderFlag of `--refittable` (REFIT: every weight refittable), where this TensorRT has it."""
    if not hasattr(trt.BuilderFlag, "REFIT"):
        raise TrtkitError(f"{trt.__name__} has no BuilderFlag.REFIT: cannot build a refittable engine")
    return "REFIT"


def _check_backend(config: BuildConfig, backend: Any) -> None:
    if backend.is_rtx:
        return
    if config.target_cc:
        raise TrtkitError("--target-cc is for TensorRT-RTX (--backend rtx); TensorRT builds for the GPU it runs on")
    if backend.gpu is None:
        raise TrtkitError(f"TensorRT {backend.version} needs a CUDA GPU to build ({backend.why_not_run or 'none found'}); "
                          "use --backend rtx to build on the CPU with TensorRT-RTX")


def _calib_files(calib: Path) -> list[Path]:
    side = calib.with_suffix(".safetensors")
    return [calib, side] if side.is_file() else [calib]


def checked_output(config: BuildConfig) -> BuildConfig:
    """Every verb's output checks (trtkit._files.check_output), before any work: a folder gets
    `<onnx stem>.plan`; neither the plan nor its .json/.layers.json may be a device node, a folder or
    one of the inputs (the ONNX and its data, the calibration file)."""
    onnx = config.onnx
    inputs = [onnx, onnx.parent / (onnx.name + ".data")]
    if config.calib is not None:
        inputs += [config.calib, config.calib.with_suffix(".safetensors")]
    out = check_output(config.output, default_name=onnx.with_suffix(".plan").name, inputs=inputs,
                       sidecars=lambda o: [o.with_suffix(".json"), o.with_suffix(".layers.json")], what="plan")
    if config.timing_cache is not None:  # read and written: only a folder or a device node is refused
        check_output(config.timing_cache, what="timing cache")
    return config if out == config.output else dataclasses.replace(config, output=out)


def _key_material(config: BuildConfig, backend: Any, source: OnnxSource, profiles: list[ProfileShapes],
                  onnx_sha: str, calib_sha: str | None) -> dict[str, Any]:
    return {
        "trtkit": trtkit.__version__, "backend": backend.name, "backend_version": backend.version,
        "target": list(_rtx_targets(config, source)) if backend.is_rtx else [backend.gpu, backend.compute_capability],
        "onnx_sha256": onnx_sha, "calib_sha256": calib_sha if not source.has_qdq else None,
        "precision": config.precision, "fp16_rest": pr.fp16_rest(config, source), "quant_level": config.quant_level,
        "profiles": [p.to_json() for p in profiles], "opt_level": config.effective_opt_level,
        "workspace": config.workspace_bytes, "build_flags": rtx_build_flags(backend.trt) if backend.is_rtx else [],
        **({"refittable": True} if config.refittable else {}),  # absent when off: old cache keys stay valid
    }


class _LastError(logging.Handler):
    """Keeps TensorRT's last error message during a build, for the one-line failure."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage().splitlines()[0] if record.getMessage() else self.message

    @contextlib.contextmanager
    def attached(self) -> Iterator[_LastError]:
        trt_log = logging.getLogger("trtkit.tensorrt")
        trt_log.addHandler(self)
        try:
            yield self
        finally:
            trt_log.removeHandler(self)


def _stop_if_cancelled(state: BuildProgress, backend: Any) -> None:
    """Raise BuildCancelled after a TensorRT call during which the build was cancelled or Ctrl-C hit."""
    try:
        backend.logger.reraise_interrupt()
    except KeyboardInterrupt:
        state.cancel("interrupted (Ctrl-C)")
    if state.cancelled:
        raise BuildCancelled(f"build cancelled ({state.cancel_reason}); no plan written")


def build(config: BuildConfig, progress: BuildProgress | None = None,
          status: Callable[[str], None] | None = None) -> BuildResult:
    """Build `config.onnx` into `config.output` (+ `.json`, `.layers.json`). One-line TrtkitError on bad input.

    `progress` lets a caller watch or cancel (`progress.cancel()`) from another thread; `status`
    receives a line per step before TensorRT's own phases (hashing, graph passes, parsing).
    """
    say = status or (lambda msg: log.info("%s", msg))
    from trtkit.backend import load_backend

    config = checked_output(config)

    t0 = time.perf_counter()
    notes: list[str] = []
    backend = load_backend(config.backend)
    _check_backend(config, backend)
    source = read_onnx(config.onnx)
    fp8_error = fp8_gpu_error(config.precision, source.qdq_types, backend.name, backend.compute_capability)
    if fp8_error:
        raise TrtkitError(fp8_error)
    check_output(config.output, inputs=source.data_files, what="plan",
                 sidecars=lambda o: [o.with_suffix(".json"), o.with_suffix(".layers.json")])
    profiles, dims_from = resolve_profiles(config, source)
    pr.check_precision(config, source, notes)
    targets = _rtx_targets(config, source) if backend.is_rtx else ()
    out_dir = ensure_writable_dir(config.output.parent)

    size = sum(p.stat().st_size for p in (source.path, *source.data_files))
    say(f"hashing {source.path.name} ({size / 2**20:.0f} MiB with its data) for the cache key")
    onnx_sha = source.sha256()
    calib_sha = sha256_files(_calib_files(config.calib)) if config.calib else None
    key = md.cache_key(_key_material(config, backend, source, profiles, onnx_sha, calib_sha))
    names = [p.name for p in profiles]
    if not config.force and md.is_cache_hit(config.output, config.metadata_path, key):
        doc = md.read_metadata(config.metadata_path) or {}
        layers = config.layers_path if config.layers_path.is_file() else None
        log.info("cache hit: %s was built with the same inputs and settings (key %s)", config.output, key[:12])
        return BuildResult(config.output, config.metadata_path, layers, True, time.perf_counter() - t0,
                           float(doc.get("build_seconds", 0.0)), key, names, pr.engine_precision(config, source), backend.name,
                           ["cache hit: same ONNX, settings and backend; --force rebuilds"])

    trt = backend.trt
    strongly_typed = pr.strongly_typed(backend)
    before = plan_identity(config.output)
    # Held from the plan's move until its metadata is written: two builds to one path leave one build's pair.
    with contextlib.ExitStack() as pair_lock:
        with tempfile.TemporaryDirectory(prefix=f".{config.output.name}.work-", dir=out_dir) as work_dir:
            graph = pr.prepare_onnx(config, backend, source, profiles, Path(work_dir), notes, say)
            flags = pr.precision_flags(config, backend, source, graph)

            # Ctrl-C cancels from here on: a KeyboardInterrupt inside TensorRT's parse would be dropped by
            # TensorRT (it catches what its logger callback raises), so the handler only records it.
            state = progress or BuildProgress()
            backend.logger.interrupted.clear()
            with cancel_on_sigint(state), DropAfterCancel(state).attached():
                builder: trt_api.Builder = trt.Builder(backend.logger)
                network = builder.create_network(network_flags(backend, strongly_typed))
                say(f"parsing {graph.path.name} with {trt.__name__} {backend.version}")
                parser = parse_onnx(backend, network, graph.path)
                _stop_if_cancelled(state, backend)
                io = network_io(network)
                cfg = builder.create_builder_config()
                for f in flags:
                    cfg.set_flag(getattr(trt.BuilderFlag, f))
                cfg.builder_optimization_level = config.effective_opt_level
                cfg.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
                workspace = config.workspace_bytes
                if workspace is not None:
                    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
                other_flags = rtx_build_flags(trt) if backend.is_rtx else []
                if config.refittable:
                    other_flags.append(refit_flag(trt))
                for f in other_flags:
                    cfg.set_flag(getattr(trt.BuilderFlag, f))
                if backend.is_rtx:
                    set_rtx_targets(backend, cfg, targets)
                    if config.timing_cache is not None:
                        notes.append("--timing-cache ignored: TensorRT-RTX has no timing cache (it keeps a runtime "
                                     "cache when engines run)")
                        log.warning(notes[-1])
                timing_cache = _load_timing_cache(cfg, config, notes) if not backend.is_rtx else None
                add_profiles(trt, builder, cfg, network, profiles)

                last_error = _LastError()
                with atomic_path(config.output) as tmp_plan:
                    title = (f"building {config.output.name} ({pr.engine_precision(config, source)}, {backend.name} "
                             f"{backend.version})")
                    with progress_display(config.progress, title) as display:
                        if progress is None:
                            state.show_on(display)
                        monitor = make_monitor(trt, state)
                        cfg.progress_monitor = monitor
                        tb = time.perf_counter()
                        with last_error.attached():
                            plan = None if state.cancelled else builder.build_serialized_network(network, cfg)
                        build_seconds = time.perf_counter() - tb
                    _stop_if_cancelled(state, backend)
                    if plan is None:
                        raise TrtkitError(f"TensorRT could not build {config.onnx.name}: "
                                          f"{last_error.message or 'see the log above (--verbose)'}")
                    with open(tmp_plan, "wb") as fh:
                        fh.write(memoryview(plan))
                    plan_sha = hashlib.sha256(memoryview(plan)).hexdigest()
                    plan_bytes = tmp_plan.stat().st_size
                    pair_lock.enter_context(output_lock(out_dir))
                    # The old metadata goes before the new plan lands, so no stale key ever vouches for it.
                    config.metadata_path.unlink(missing_ok=True)
                    config.layers_path.unlink(missing_ok=True)
                    if plan_identity(config.output) != before:
                        notes.append(f"another build wrote {config.output.name} while this one ran; this build's "
                                     "plan and metadata replace it (the last build to finish wins)")
                        log.warning(notes[-1])
                    kept = keep_qdq_onnx(qdq_onnx_path(config), source, graph)
                    if kept is not None:
                        notes.append(f"kept the Q/DQ ONNX TensorRT parsed as {kept['path']} beside the plan "
                                     "(`trtkit inspect` cross-checks the engine against it)")
            if timing_cache is not None and config.timing_cache is not None:
                write_bytes_atomic(config.timing_cache, bytes(memoryview(cfg.get_timing_cache().serialize())))
            shapes = md.inspection_shapes([p.to_json() for p in profiles])
            layers_text, layers_reason = (md.engine_layers(backend, plan, shapes) if config.save_layers
                                          else (None, "not asked"))
            del plan, cfg, parser, network, builder, monitor  # TensorRT objects go before the monitor they point at
        layers_path = None
        if layers_text is not None:
            layers_path = write_text_atomic(config.layers_path, layers_text)

        doc = md.engine_document(
            config, backend, source, graph, targets=targets, strongly_typed=strongly_typed, precision_flags=flags,
            builder_flags=other_flags, profiles=profiles, io=io, timing_cache_used=timing_cache is not None,
            onnx_sha=onnx_sha, calib_sha=calib_sha, dims_from=dims_from, qdq_onnx=kept, build_seconds=build_seconds,
            plan={"path": config.output.name, "bytes": plan_bytes, "sha256": plan_sha},
            layers_path=layers_path, layers_reason=layers_reason, shapes=shapes, notes=notes, key=key)
        md.write_metadata(config.metadata_path, doc)
    return BuildResult(config.output, config.metadata_path, layers_path, False, time.perf_counter() - t0,
                       build_seconds, key, names, pr.engine_precision(config, source), backend.name, notes)


def _load_timing_cache(cfg: trt_api.IBuilderConfig, config: BuildConfig,
                       notes: list[str]) -> trt_api.ITimingCache | None:
    """Load (or start) the timing cache; a mismatched one is replaced rather than failing the build."""
    if config.timing_cache is None:
        return None
    data = config.timing_cache.read_bytes() if config.timing_cache.is_file() else b""
    cache = cfg.create_timing_cache(data)
    if not cfg.set_timing_cache(cache, False):
        notes.append(f"timing cache {config.timing_cache} is from another GPU or TensorRT; starting a new one")
        log.warning(notes[-1])
        cache = cfg.create_timing_cache(b"")
        cfg.set_timing_cache(cache, False)
    if config.effective_opt_level == 0:
        notes.append("optimization level 0 ignores the timing cache")
    return cache
