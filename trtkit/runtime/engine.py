"""The thin shell around TensorRT: deserialize a plan, create its context, set profiles, shapes and
addresses, enqueue. Every decision (which backend, which profile, buffer shapes, host encodings, the shared
area's size, which log lines an error quotes) is a plain function of plan.py / host_dtypes.py, tested on the
CPU with the metadata of real TensorRT-RTX plans; this module only applies them. None of it has executed
against a real TensorRT runtime yet (docs/runtime.md lists it).

* Deserialization keeps `engine_host_code_allowed` off unless the caller trusts the plan (a
  version-compatible plan carries a lean runtime that TensorRT would load and run in this process).
* Contexts come from `engine.create_runtime_config()` where it exists: USER_MANAGED memory when engines
  share one activation area, and on TensorRT-RTX EAGER shape specialization plus a runtime cache kept in
  `x.runtime_cache` beside `x.plan` (loaded before the context, saved after the first run).

No torch here: buffers are cuda.DeviceArray (cuda-python), TensorRT is reached through backend.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trtkit.runtime import cuda
from trtkit.runtime.cuda import DeviceArray, DeviceBuffer
from trtkit.runtime.host_dtypes import decode, encode, storage_dtype
from trtkit.runtime.plan import (
    EngineDesc,
    EngineError,
    ProfileSpec,
    Shape,
    TensorSpec,
    area_after,
    check_supported,
    choose_backend,
    dtype_name,
    error_lines,
    fmt,
    max_over,
    pick_profile,
)

if TYPE_CHECKING:  # the TensorRT 10 API as typed by stubs/ (never imported at run time)
    import tensorrt as trt_api

__all__ = ["Engine", "EngineError", "SharedActivations", "load_engines", "runtime_cache_path"]
log = logging.getLogger(__name__)


def runtime_cache_path(plan: Path) -> Path:
    """x.plan -> x.runtime_cache (TensorRT-RTX's JIT-compiled kernels for this GPU)."""
    return plan.with_suffix(".runtime_cache")


def plan_backend(path: Path, requested: str | None = None) -> str:
    """The backend that runs `path`: read from its header / x.json (plan.choose_backend); no TensorRT needed."""
    from trtkit.inspector.plan_file import meta_backend, read_metadata, read_plan_header

    return choose_backend(path.name, read_plan_header(path).flavour, meta_backend(read_metadata(path))[0],
                          requested or os.environ.get("TRTKIT_BACKEND") or None)


def _dims(d: Any) -> Shape:
    """A TensorRT Dims as a tuple (Dims has __len__ and __getitem__, typed without __iter__)."""
    return tuple(int(d[i]) for i in range(len(d)))


def describe(trt: Any, engine: trt_api.ICudaEngine, name: str, backend: str | None,
             profile_names: list[str] | None = None) -> EngineDesc:
    """The engine's own I/O and every optimization profile's ranges (dynamic inputs only)."""
    n_prof = int(engine.num_optimization_profiles)
    names = profile_names if profile_names and len(profile_names) == n_prof else [str(k) for k in range(n_prof)]
    tensors: list[TensorSpec] = []
    ranges: list[dict[str, tuple[Shape, Shape, Shape]]] = [{} for _ in range(n_prof)]
    for i in range(engine.num_io_tensors):
        n = engine.get_tensor_name(i)
        is_in = engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        shape = _dims(engine.get_tensor_shape(n))
        tensors.append(TensorSpec(n, is_in, dtype_name(engine.get_tensor_dtype(n).name), shape))
        if is_in and -1 in shape:
            for k in range(n_prof):
                mn, opt, mx = engine.get_tensor_profile_shape(n, k)
                ranges[k][n] = (_dims(mn), _dims(opt), _dims(mx))
    return EngineDesc(name, tuple(tensors), tuple(ProfileSpec(nm, r) for nm, r in zip(names, ranges, strict=True)),
                      backend)


def create_context(trt: Any, engine: trt_api.ICudaEngine, user_managed: bool, cache_blob: bytes | None
                   ) -> tuple[trt_api.IExecutionContext | None, Any, Any]:
    """(context, runtime config, runtime cache); the last two are kept alive beside the context."""
    strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED if user_managed else None
    if not hasattr(engine, "create_runtime_config"):  # TensorRT < 10.11: no IRuntimeConfig
        ctx = engine.create_execution_context(strategy) if strategy is not None else engine.create_execution_context()
        return ctx, None, None
    rc: Any = engine.create_runtime_config()
    if strategy is not None:
        rc.set_execution_context_allocation_strategy(strategy)
    if hasattr(rc, "dynamic_shapes_kernel_specialization_strategy"):
        # TensorRT-RTX: compile the shape-specialized kernels when shapes are set, not in the background after
        # a few runs (a captured graph would keep the fallback kernels)
        rc.dynamic_shapes_kernel_specialization_strategy = trt.DynamicShapesKernelSpecializationStrategy.EAGER
    cache = None
    if hasattr(rc, "create_runtime_cache"):
        cache = rc.create_runtime_cache()
        if cache_blob and not cache.deserialize(cache_blob):
            log.warning("runtime cache not reused (another GPU, driver or TensorRT-RTX version); it is rebuilt")
        if rc.set_runtime_cache(cache) is False:
            log.warning("TensorRT-RTX refused the runtime cache; kernels are compiled again at every load")
            cache = None
    return engine.create_execution_context(rc), rc, cache


class SharedActivations:
    """One device area for the activations of several engines run one after another on one stream."""

    def __init__(self) -> None:
        self.buffer: DeviceBuffer | None = None
        self.size = 0
        self.users: list[Engine] = []

    def attach(self, engine: Engine) -> None:
        self.users.append(engine)
        size = area_after(self.size, engine.device_memory_size())
        if size > self.size:  # grow: every attached context gets the new area
            self.buffer, self.size = DeviceBuffer(size), size
            for e in self.users:
                e._set_device_memory(self.buffer.ptr, self.size)
        else:  # no engine needed memory yet: a null pointer of size 0 is allowed
            engine._set_device_memory(self.buffer.ptr if self.buffer else 0, self.size)


class Engine:
    """One deserialized plan with one execution context; `desc` says what it takes (all profiles)."""

    def __init__(self, trt: Any, engine: trt_api.ICudaEngine, desc: EngineDesc, user_managed: bool,
                 cache_path: Path | None = None) -> None:
        check_supported(desc)
        self.trt, self.engine, self.desc, self.name = trt, engine, desc, desc.name
        blob = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else None
        ctx, self._rc, self._cache = create_context(trt, engine, user_managed, blob)
        if ctx is None:
            raise EngineError(f"{self.name}: TensorRT could not create an execution context (out of GPU memory?)")
        self.context: trt_api.IExecutionContext = ctx
        self.profile = 0  # a new context is on profile 0
        self.bound: dict[str, int] = {}
        self._device_memory = 0
        self._runtime: Any = None
        self._cache_path, self._cache_saved, self._runs = cache_path, False, 0
        self._stream: cuda.Stream | None = None
        self._max_bufs: dict[str, DeviceArray] | None = None

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path | str, trust_engine: bool = False, backend: str | None = None,
             activations: SharedActivations | None = None, refit: dict[str, Any] | None = None) -> Engine:
        """`refit`: weights by name set through TensorRT's Refitter before the context exists (runtime/refit.py)."""
        from trtkit.backend import load_backend
        from trtkit.inspector.engine_report import runs_here
        from trtkit.inspector.plan_file import read_metadata, read_plan_header

        path = Path(path)
        if not path.is_file():
            raise EngineError(f"engine {path} does not exist")
        meta = read_metadata(path)
        be = load_backend(plan_backend(path, backend))
        ok, why = runs_here(be, read_plan_header(path), meta)  # RTX on Turing: only plans built for 7.5
        if not ok:
            raise EngineError(f"cannot run {path.name} here: {why or 'no GPU'}")
        cuda.init()
        trt = be.trt
        runtime: trt_api.Runtime = trt.Runtime(be.logger)
        if hasattr(runtime, "engine_host_code_allowed"):
            runtime.engine_host_code_allowed = bool(trust_engine)
        seen = len(getattr(be.logger, "messages", []))
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            errs = error_lines(getattr(be.logger, "messages", [])[seen:])
            hint = None if trust_engine else ("if the plan was built version-compatible it carries host code: "
                                              "pass --trust-engine only for plans you trust")
            raise EngineError(f"TensorRT could not deserialize {path.name}: {' | '.join(errs)[-300:] or 'no error logged'}",
                              hint=hint)
        if refit:  # a LoRA's weights (`trtkit run --lora`), into this process's copy of the engine only
            from trtkit.runtime.refit import refit_engine

            refit_engine(trt, be.logger, engine, refit, path.name)
        names = [str(p.get("name")) for p in meta.get("profiles") or [] if isinstance(p, dict)] if meta else None
        desc = describe(trt, engine, path.stem, be.name, names)
        e = cls(trt, engine, desc, user_managed=activations is not None,
                cache_path=runtime_cache_path(path) if be.is_rtx else None)
        e._runtime = runtime  # the runtime must outlive its engines
        if activations is not None:
            activations.attach(e)
        return e

    def device_memory_size(self) -> int:
        eng: Any = self.engine
        return int(eng.device_memory_size_v2 if hasattr(eng, "device_memory_size_v2") else eng.device_memory_size)

    def _set_device_memory(self, ptr: int, size: int) -> None:
        ctx: Any = self.context
        if hasattr(ctx, "set_device_memory"):
            ctx.set_device_memory(ptr, size)
        else:  # TensorRT 10.0: the write-only property
            ctx.device_memory = ptr
        self._device_memory = ptr

    # -- description -----------------------------------------------------------------------------
    @property
    def inputs(self) -> list[str]:
        return self.desc.inputs

    @property
    def outputs(self) -> list[str]:
        return self.desc.outputs

    def dtype_of(self, name: str) -> str:
        return self.desc.tensor(name).dtype

    def check_shapes(self, shapes: Mapping[str, Shape]) -> None:
        pick_profile(self.desc, shapes)

    # -- profiles, shapes, buffers ----------------------------------------------------------------
    def _side_stream(self) -> cuda.Stream:
        if self._stream is None:
            self._stream = cuda.Stream()
        return self._stream

    def set_shapes(self, shapes: Mapping[str, Shape]) -> dict[str, Shape]:
        """Switch to the first profile covering `shapes`, set them; returns the output shapes."""
        k = pick_profile(self.desc, shapes)
        if k != self.profile:
            s = self._side_stream()
            if not self.context.set_optimization_profile_async(k, s.handle):
                raise EngineError(f"{self.name}: TensorRT refused optimization profile {k}")
            s.synchronize()  # the switch may enqueue copies; later work may run on another stream
            self.profile = k
        for n, shape in shapes.items():
            if not self.context.set_input_shape(n, tuple(int(v) for v in shape)):
                raise EngineError(f"{self.name}: TensorRT refused shape {fmt(shape)} for {n} (profile {k})")
        missing = self.context.infer_shapes()
        if missing:
            raise EngineError(f"{self.name}: shapes of {', '.join(missing)} are not specified")
        return {n: _dims(self.context.get_tensor_shape(n)) for n in self.outputs}

    def max_shapes(self) -> dict[str, Shape]:
        """Every tensor's buffer shape: inputs at each profile's max, outputs as TensorRT infers them, the
        element-wise max over profiles."""
        per = []
        for p in self.desc.profiles or (ProfileSpec("static"),):
            ins = {t.name: (p.ranges[t.name][2] if t.name in p.ranges else t.shape)
                   for t in self.desc.tensors if t.is_input}
            per.append({**ins, **self.set_shapes(ins)})
        return max_over(per)

    def allocate(self) -> dict[str, DeviceArray]:
        """Every I/O buffer once, big enough for every profile (smaller calls reuse them)."""
        return {n: DeviceArray.empty(s, storage_dtype(self.dtype_of(n))) for n, s in self.max_shapes().items()}

    # -- binding and running ---------------------------------------------------------------------
    def bind(self, arrays: Mapping[str, DeviceArray]) -> None:
        """Profile and input shapes from the arrays, then every tensor address; checks dtypes and sizes."""
        for n, a in arrays.items():
            want = storage_dtype(self.dtype_of(n))
            if np.dtype(a.dtype) != want:
                raise EngineError(f"{self.name} tensor {n}: buffer is {np.dtype(a.dtype)}, the engine wants "
                                  f"{self.dtype_of(n)}")
        outs = self.set_shapes({n: tuple(a.shape) for n, a in arrays.items() if n in self.inputs})
        for n, need in outs.items():
            if n not in arrays:
                raise EngineError(f"{self.name}: no buffer for output {n}")
            if int(np.prod(need)) > arrays[n].size:
                raise EngineError(f"{self.name} output {n}: needs {fmt(need)}, buffer holds {fmt(arrays[n].shape)}")
        for n in self.desc.inputs + self.desc.outputs:
            if not self.context.set_tensor_address(n, arrays[n].ptr):
                raise EngineError(f"{self.name}: TensorRT refused the address of {n}")
        self.bound = {n: arrays[n].ptr for n in arrays}

    def infer(self, feeds: Mapping[str, np.ndarray], stream: int | None = None) -> dict[str, np.ndarray]:
        """One synchronous call on host arrays (text encoders, VAE, `trtkit doctor`): values encoded to the
        engine's dtypes, outputs decoded (bf16/fp8 as float32); buffers allocated once for every profile."""
        h = self._side_stream().handle if stream is None else stream
        if self._max_bufs is None:
            self._max_bufs = self.allocate()
        bufs = self._max_bufs
        outs = self.set_shapes({n: tuple(np.shape(v)) for n, v in feeds.items()})
        views = {n: DeviceArray(bufs[n].buffer, tuple(s), bufs[n].dtype)
                 for n, s in {**{n: np.shape(v) for n, v in feeds.items()}, **outs}.items()}
        for n, v in feeds.items():
            views[n].upload(encode(v, self.dtype_of(n)), h)
        self.bind(views)
        self.execute(h)
        result = {n: decode(views[n].download(h), self.dtype_of(n)) for n in self.outputs}
        self.save_runtime_cache()
        return result

    def execute(self, stream: int) -> None:
        if not self.bound:
            raise EngineError(f"{self.name}: bind() buffers before execute()")
        if not self.context.execute_async_v3(stream):
            raise EngineError(f"{self.name}: execute_async_v3 failed (see the TensorRT log with --verbose)")
        self._runs += 1

    def capturable(self, stream: int) -> bool:
        """TensorRT-RTX says whether this context can be stream-captured (no runtime allocation); full
        TensorRT has no such query and is captured after a warm-up run."""
        ask = getattr(self.context, "is_stream_capturable", None)
        return True if ask is None else bool(ask(stream))

    def save_runtime_cache(self) -> None:
        """Write the RTX runtime cache once, after the first run (never while a stream is being captured)."""
        if self._cache is None or self._cache_path is None or self._cache_saved or not self._runs:
            return
        from trtkit._files import write_bytes_atomic

        try:
            write_bytes_atomic(self._cache_path, bytes(memoryview(self._cache.serialize())))
        except OSError as e:  # a read-only engine folder costs a re-JIT next time, not this run
            log.warning("runtime cache not saved to %s: %s", self._cache_path, e)
        self._cache_saved = True

    def fingerprint(self) -> tuple:
        """What a captured graph bakes in besides the bound buffers."""
        return (id(self.context), self._device_memory, self.profile, tuple(sorted(self.bound.items())))


def load_engines(folder: Path | str, names: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2",
                                                               "vae_decoder"),
                 trust_engine: bool = False, backend: str | None = None,
                 refit: dict[str, dict[str, Any]] | None = None) -> dict[str, Engine]:
    """The engines of a pipeline folder (`<name>.plan`) that exist, sharing one activation area; `refit`: new
    weights by engine name (`{"unet": {...}}`), set at load."""
    folder = Path(folder)
    shared = SharedActivations()
    out = {n: Engine.load(folder / f"{n}.plan", trust_engine, backend, shared, (refit or {}).get(n))
           for n in names if (folder / f"{n}.plan").is_file()}
    if not out:
        raise EngineError(f"{folder} has no engines ({', '.join(n + '.plan' for n in names)})")
    return out
