"""A TensorRT plan on preallocated buffers: load, describe, allocate once, bind once, check shapes.

* Deserialization keeps `engine_host_code_allowed` off unless the caller trusts the plan (a
  version-compatible plan carries a lean runtime that TensorRT would load and run in this process).
* Several engines of one pipeline that run one after another on one stream can share ONE activation
  area (USER_MANAGED contexts + set_device_memory), sized to the largest of them, as the anchors do.
* Every call's shapes are checked against the engine's optimization profile, with one-line errors.

No torch here: buffers are cuda.DeviceArray (cuda-python), TensorRT is reached through backend.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trtkit.errors import TrtkitError
from trtkit.runtime import cuda
from trtkit.runtime.cuda import DeviceArray, DeviceBuffer

# TensorRT DataType member name -> numpy-style dtype name (bf16 is stored as uint16 on the host side).
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
              "INT8": "int8", "UINT8": "uint8", "BOOL": "bool", "FP8": "float8_e4m3fn"}
HOST_DTYPES = {"bfloat16": np.uint16, "float8_e4m3fn": np.uint8}


class EngineError(TrtkitError):
    """An engine cannot be loaded or run as asked."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    is_input: bool
    dtype: str
    shape: tuple[int, ...]  # -1 marks a dynamic dimension
    min: tuple[int, ...] | None = None  # profile 0 range of an input
    max: tuple[int, ...] | None = None

    @property
    def host_dtype(self) -> Any:
        return HOST_DTYPES.get(self.dtype, self.dtype)


def _fmt(d: tuple[int, ...] | None) -> str:
    return "x".join(str(v) for v in d) if d else "?"


def check_shapes(tensors: Mapping[str, TensorInfo], shapes: Mapping[str, tuple[int, ...]], what: str = "engine"
                 ) -> None:
    """Raise a one-line EngineError unless `shapes` names every input once and each fits the profile."""
    inputs = {n: t for n, t in tensors.items() if t.is_input}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise EngineError(f"{what} has no input {', '.join(unknown)}", hint=f"inputs: {', '.join(inputs)}")
    missing = sorted(set(inputs) - set(shapes))
    if missing:
        raise EngineError(f"{what} input {', '.join(missing)} not given")
    for name, t in inputs.items():
        s = tuple(int(v) for v in shapes[name])
        if len(s) != len(t.shape):
            raise EngineError(f"{what} input {name}: rank {len(s)} ({_fmt(s)}), the engine takes rank "
                              f"{len(t.shape)} ({_fmt(t.shape)})")
        for i, (v, e) in enumerate(zip(s, t.shape, strict=True)):
            if e != -1 and v != e:
                raise EngineError(f"{what} input {name}: {_fmt(s)} but dimension {i} is fixed to {e} "
                                  f"({_fmt(t.shape)})")
        if t.min is not None and t.max is not None and not all(lo <= v <= hi for v, lo, hi in zip(s, t.min, t.max, strict=True)):
            raise EngineError(f"{what} input {name}: {_fmt(s)} is outside the engine's profile "
                              f"(min {_fmt(t.min)}, max {_fmt(t.max)})",
                              hint="build the engine with a profile that covers this shape")


class SharedActivations:
    """One device area for the activations of several engines run one after another on one stream."""

    def __init__(self) -> None:
        self.buffer: DeviceBuffer | None = None
        self.size = 0
        self.users: list[Engine] = []

    def attach(self, engine: Engine) -> None:
        need = engine.device_memory_size()
        self.users.append(engine)
        if need > self.size:  # grow: every attached context gets the new area
            self.buffer = DeviceBuffer(need)
            self.size = need
            for e in self.users:
                e._set_device_memory(self.buffer.ptr, self.size)
        else:
            assert self.buffer is not None
            engine._set_device_memory(self.buffer.ptr, self.size)


class Engine:
    """One deserialized plan with one execution context (profile 0)."""

    def __init__(self, trt: Any, engine: Any, name: str, user_managed: bool) -> None:
        self.trt, self.engine, self.name = trt, engine, name
        self.tensors: dict[str, TensorInfo] = {}
        for i in range(engine.num_io_tensors):
            n = engine.get_tensor_name(i)
            is_in = engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
            dt = TRT_DTYPES.get(engine.get_tensor_dtype(n).name, engine.get_tensor_dtype(n).name.lower())
            shape = tuple(int(v) for v in engine.get_tensor_shape(n))
            lo = hi = None
            if is_in and engine.num_optimization_profiles > 0:
                mn, _, mx = engine.get_tensor_profile_shape(n, 0)
                lo, hi = tuple(int(v) for v in mn), tuple(int(v) for v in mx)
            self.tensors[n] = TensorInfo(n, is_in, dt, shape, lo, hi)
        if user_managed:
            strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
            self.context = engine.create_execution_context(strategy)
        else:
            self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{name}: TensorRT could not create an execution context (out of GPU memory?)")
        self.bound: dict[str, int] = {}
        self._device_memory = 0
        self._runtime: Any = None

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path | str, trust_engine: bool = False, backend: str | None = None,
             activations: SharedActivations | None = None) -> Engine:
        from trtkit.backend import load_backend

        path = Path(path)
        if not path.is_file():
            raise EngineError(f"engine {path} does not exist")
        be = load_backend(backend)
        if not be.can_run:
            raise EngineError(f"cannot run engines here: {be.why_not_run or 'no GPU'}")
        cuda.init()
        trt = be.trt
        runtime = trt.Runtime(be.logger)
        if hasattr(runtime, "engine_host_code_allowed"):
            runtime.engine_host_code_allowed = bool(trust_engine)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            last = [m for lvl, m in getattr(be.logger, "messages", [])[-5:]]
            hint = None if trust_engine else ("if the plan was built version-compatible it carries host code: "
                                              "pass --trust-engine only for plans you trust")
            raise EngineError(f"TensorRT could not deserialize {path.name}: {' | '.join(last)[-300:] or 'no log'}",
                              hint=hint)
        e = cls(trt, engine, path.stem, user_managed=activations is not None)
        e._runtime = runtime  # the runtime must outlive its engines
        if activations is not None:
            activations.attach(e)
        return e

    def device_memory_size(self) -> int:
        eng = self.engine
        return int(eng.device_memory_size_v2 if hasattr(eng, "device_memory_size_v2") else eng.device_memory_size)

    def _set_device_memory(self, ptr: int, size: int) -> None:
        if hasattr(self.context, "set_device_memory"):
            self.context.set_device_memory(ptr, size)
        else:  # TensorRT 10.0: the write-only property
            self.context.device_memory = ptr
        self._device_memory = ptr

    # -- description -----------------------------------------------------------------------------
    @property
    def inputs(self) -> list[str]:
        return [n for n, t in self.tensors.items() if t.is_input]

    @property
    def outputs(self) -> list[str]:
        return [n for n, t in self.tensors.items() if not t.is_input]

    def dtype_of(self, name: str) -> str:
        if name not in self.tensors:
            raise EngineError(f"{self.name} has no tensor {name}", hint=f"tensors: {', '.join(self.tensors)}")
        return self.tensors[name].dtype

    def check_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        check_shapes(self.tensors, shapes, self.name)

    def max_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each input at the profile's max; each output as TensorRT infers it from those."""
        shapes = {n: (t.max or t.shape) for n, t in self.tensors.items() if t.is_input}
        for n, s in shapes.items():
            self.context.set_input_shape(n, s)
        for n in self.outputs:
            shapes[n] = tuple(int(v) for v in self.context.get_tensor_shape(n))
        return shapes

    def allocate(self) -> dict[str, DeviceArray]:
        """Every I/O buffer once, at the profile's max shapes (smaller calls reuse them)."""
        return {n: DeviceArray.empty(s, self.tensors[n].host_dtype) for n, s in self.max_shapes().items()}

    # -- binding and running ---------------------------------------------------------------------
    def bind(self, arrays: Mapping[str, DeviceArray]) -> None:
        """Set input shapes from the arrays, then every tensor address; checks dtypes and output sizes."""
        self.check_shapes({n: a.shape for n, a in arrays.items() if n in self.tensors and self.tensors[n].is_input})
        for n, a in arrays.items():
            if n not in self.tensors:
                raise EngineError(f"{self.name} has no tensor {n}")
            want = np.dtype(self.tensors[n].host_dtype)
            if np.dtype(a.dtype) != want:
                raise EngineError(f"{self.name} tensor {n}: buffer is {np.dtype(a.dtype)}, the engine wants "
                                  f"{self.tensors[n].dtype}")
        for n in self.inputs:
            if not self.context.set_input_shape(n, arrays[n].shape):
                raise EngineError(f"{self.name}: TensorRT refused shape {_fmt(arrays[n].shape)} for {n}")
        missing = self.context.infer_shapes()
        if missing:
            raise EngineError(f"{self.name}: shapes of {', '.join(missing)} are not specified")
        for n in self.outputs:
            if n not in arrays:
                raise EngineError(f"{self.name}: no buffer for output {n}")
            need = tuple(int(v) for v in self.context.get_tensor_shape(n))
            if int(np.prod(need)) > arrays[n].size:
                raise EngineError(f"{self.name} output {n}: needs {_fmt(need)}, buffer holds {_fmt(arrays[n].shape)}")
        for n in self.tensors:
            if not self.context.set_tensor_address(n, arrays[n].ptr):
                raise EngineError(f"{self.name}: TensorRT refused the address of {n}")
        self.bound = {n: arrays[n].ptr for n in self.tensors}

    def infer(self, feeds: Mapping[str, np.ndarray], stream: int) -> dict[str, np.ndarray]:
        """One synchronous call on host arrays (text encoders, VAE): buffers allocated once at the profile's
        max shapes, each call a view of them."""
        if not hasattr(self, "_max_bufs"):
            self._max_bufs = self.allocate()
        self.check_shapes({n: tuple(v.shape) for n, v in feeds.items()})
        views: dict[str, DeviceArray] = {}
        for n, v in feeds.items():
            views[n] = DeviceArray(self._max_bufs[n].buffer, tuple(v.shape), self._max_bufs[n].dtype)
            views[n].upload(np.asarray(v, dtype=views[n].dtype), stream)
            self.context.set_input_shape(n, tuple(v.shape))
        for n in self.outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(n))
            views[n] = DeviceArray(self._max_bufs[n].buffer, shape, self._max_bufs[n].dtype)
        self.bind(views)
        self.execute(stream)
        return {n: views[n].download(stream) for n in self.outputs}

    def execute(self, stream: int) -> None:
        if not self.bound:
            raise EngineError(f"{self.name}: bind() buffers before execute()")
        if not self.context.execute_async_v3(stream):
            raise EngineError(f"{self.name}: execute_async_v3 failed (see the TensorRT log with --verbose)")

    def fingerprint(self) -> tuple:
        """What a captured graph bakes in besides the bound buffers."""
        return (id(self.context), self._device_memory, tuple(sorted(self.bound.items())))


def load_engines(folder: Path | str, names: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2",
                                                               "vae_decoder"),
                 trust_engine: bool = False, backend: str | None = None) -> dict[str, Engine]:
    """The engines of a pipeline folder (`<name>.plan`) that exist, sharing one activation area."""
    folder = Path(folder)
    shared = SharedActivations()
    out = {n: Engine.load(folder / f"{n}.plan", trust_engine, backend, shared)
           for n in names if (folder / f"{n}.plan").is_file()}
    if not out:
        raise EngineError(f"{folder} has no engines ({', '.join(n + '.plan' for n in names)})")
    return out
