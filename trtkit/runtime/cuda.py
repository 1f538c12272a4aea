"""Thin helpers over cuda-python's driver API: context, device buffers, streams, events, graph capture.

The TensorRT path of the runtime uses only these (no torch), so a deployed `trtkit run` needs TensorRT,
cuda-python and numpy. Everything uses the device's primary context, the one torch uses too, so buffers
made here can be shared with torch without copies.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from trtkit.errors import TrtkitError


class CudaError(RuntimeError):
    """A CUDA driver or NVRTC call failed (an internal error, not a user mistake)."""


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise TrtkitError("cuda-python is not installed", hint="pip install cuda-python") from e
    return driver


def check(result: Any, what: str = "CUDA call") -> Any:
    """Unpack a cuda-python `(err, *values)` tuple, raising CudaError on a failure."""
    cu = _driver()
    if not isinstance(result, tuple):
        result = (result,)
    err, rest = result[0], result[1:]
    if isinstance(err, cu.CUresult):
        if err != cu.CUresult.CUDA_SUCCESS:
            _, name = cu.cuGetErrorName(err)
            _, desc = cu.cuGetErrorString(err)
            raise CudaError(f"{what}: {name.decode() if name else err} ({desc.decode() if desc else ''})")
    else:
        from cuda.bindings import nvrtc

        if isinstance(err, nvrtc.nvrtcResult) and err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CudaError(f"{what}: {err}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


_lock = threading.Lock()
_ctx: dict[int, Any] = {}


def init(device: int = 0) -> Any:
    """Make the device's primary context current on this thread (the context torch uses) and return it."""
    cu = _driver()
    with _lock:
        if device not in _ctx:
            try:
                check(cu.cuInit(0), "cuInit")
                count = check(cu.cuDeviceGetCount(), "cuDeviceGetCount")
            except CudaError as e:
                raise TrtkitError("no usable CUDA GPU", hint=str(e)) from e
            if device >= count:
                raise TrtkitError(f"CUDA device {device} does not exist ({count} visible)")
            dev = check(cu.cuDeviceGet(device))
            _ctx[device] = (dev, check(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain"))
        check(cu.cuCtxSetCurrent(_ctx[device][1]), "cuCtxSetCurrent")
        return _ctx[device][1]


def compute_capability(device: int = 0) -> tuple[int, int]:
    cu = _driver()
    init(device)
    dev = _ctx[device][0]
    a = cu.CUdevice_attribute
    major = check(cu.cuDeviceGetAttribute(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev))
    minor = check(cu.cuDeviceGetAttribute(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev))
    return int(major), int(minor)


def sm_count(device: int = 0) -> int:
    cu = _driver()
    init(device)
    return int(check(cu.cuDeviceGetAttribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                                             _ctx[device][0])))


def mem_info() -> tuple[int, int]:
    """(free, total) bytes of the current device."""
    init()
    free, total = check(_driver().cuMemGetInfo(), "cuMemGetInfo")
    return int(free), int(total)


class DeviceBuffer:
    """One cuMemAlloc'd block, freed on close() or garbage collection."""

    def __init__(self, nbytes: int) -> None:
        init()
        self.nbytes = int(nbytes)
        # Pad to 256 B: TensorRT wants 256-B aligned activation memory and cuMemAlloc gives at least that.
        self.ptr = int(check(_driver().cuMemAlloc(max(256, (self.nbytes + 255) // 256 * 256)), "cuMemAlloc"))

    def close(self) -> None:
        if getattr(self, "ptr", 0):
            try:
                _driver().cuMemFree(self.ptr)
            finally:
                self.ptr = 0

    def __del__(self) -> None:  # pragma: no cover - timing of GC
        try:
            self.close()
        except Exception:
            pass


@dataclass
class DeviceArray:
    """A typed, shaped view of a DeviceBuffer (the runtime's unit of binding: pointer + shape + dtype)."""

    buffer: DeviceBuffer
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int = 0

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: Any) -> DeviceArray:
        dt = np.dtype(dtype)
        return cls(DeviceBuffer(int(np.prod(shape, dtype=np.int64)) * dt.itemsize), tuple(shape), dt)

    @classmethod
    def from_host(cls, a: np.ndarray, stream: int = 0) -> DeviceArray:
        d = cls.empty(a.shape, a.dtype)
        d.upload(a, stream)
        return d

    @property
    def ptr(self) -> int:
        return self.buffer.ptr + self.offset

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def upload(self, a: np.ndarray, stream: int = 0) -> None:
        a = np.ascontiguousarray(a, dtype=self.dtype)
        if a.size != self.size:
            raise TrtkitError(f"cannot copy {a.shape} into a device buffer of shape {self.shape}")
        cu = _driver()
        # Async on the loop's stream, then wait: a plain cuMemcpyHtoD runs on the legacy stream, which does not
        # order with our non-blocking streams, and may return before a pageable copy has landed.
        check(cu.cuMemcpyHtoDAsync(self.ptr, a, self.nbytes, stream), "cuMemcpyHtoDAsync")
        check(cu.cuStreamSynchronize(stream), "cuStreamSynchronize")

    def download(self, stream: int = 0) -> np.ndarray:
        cu = _driver()
        out = np.empty(self.shape, self.dtype)
        check(cu.cuMemcpyDtoHAsync(out, self.ptr, self.nbytes, stream), "cuMemcpyDtoHAsync")
        check(cu.cuStreamSynchronize(stream), "cuStreamSynchronize")
        return out

    def fill_bytes(self, value: int, stream: int) -> None:
        check(_driver().cuMemsetD8Async(self.ptr, value, self.nbytes, stream), "cuMemsetD8Async")

    def copy_from(self, src: DeviceArray, stream: int) -> None:
        if src.nbytes != self.nbytes:
            raise TrtkitError(f"device copy of {src.shape} into {self.shape}")
        check(_driver().cuMemcpyDtoDAsync(self.ptr, src.ptr, self.nbytes, stream), "cuMemcpyDtoDAsync")


def copy_bytes(dst: int, src: int, nbytes: int, stream: int) -> None:
    """`nbytes` from device address `src` to `dst`, enqueued on `stream` (capturable into a graph)."""
    check(_driver().cuMemcpyDtoDAsync(dst, src, nbytes, stream), "cuMemcpyDtoDAsync")


class Stream:
    """A non-blocking stream (the legacy default stream would serialize with everything)."""

    def __init__(self, handle: int | None = None) -> None:
        init()
        cu = _driver()
        self.owned = handle is None
        self.handle = int(check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING), "cuStreamCreate")) \
            if handle is None else int(handle)

    def synchronize(self) -> None:
        check(_driver().cuStreamSynchronize(self.handle), "cuStreamSynchronize")

    def is_capturing(self) -> bool:
        cu = _driver()
        status = check(cu.cuStreamIsCapturing(self.handle), "cuStreamIsCapturing")
        return status != cu.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE

    def close(self) -> None:
        if self.owned and self.handle:
            _driver().cuStreamDestroy(self.handle)
            self.handle = 0


class Event:
    def __init__(self) -> None:
        init()
        self.handle = check(_driver().cuEventCreate(0), "cuEventCreate")

    def record(self, stream: int) -> None:
        check(_driver().cuEventRecord(self.handle, stream), "cuEventRecord")

    def elapsed_ms(self, end: Event) -> float:
        check(_driver().cuEventSynchronize(end.handle), "cuEventSynchronize")
        return float(check(_driver().cuEventElapsedTime(self.handle, end.handle), "cuEventElapsedTime"))


class CudaGraph:
    """Stream capture into an instantiated graph: begin() ... end(); launch(stream) replays it."""

    def __init__(self) -> None:
        self.graph: Any = None
        self.exec: Any = None

    def begin(self, stream: Stream) -> None:
        cu = _driver()
        # Thread-local mode: other threads' unsafe calls (e.g. a logger's) do not invalidate our capture.
        check(cu.cuStreamBeginCapture(stream.handle, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
              "cuStreamBeginCapture")

    def end(self, stream: Stream) -> None:
        cu = _driver()
        self.graph = check(cu.cuStreamEndCapture(stream.handle), "cuStreamEndCapture")
        self.exec = check(cu.cuGraphInstantiate(self.graph, 0), "cuGraphInstantiate")

    def abort(self, stream: Stream) -> None:
        """End a capture that failed, discarding it, so the stream is usable again."""
        cu = _driver()
        err, graph = cu.cuStreamEndCapture(stream.handle)
        if graph is not None and err == cu.CUresult.CUDA_SUCCESS:
            cu.cuGraphDestroy(graph)
        cu.cuCtxSynchronize()

    def launch(self, stream: int) -> None:
        check(_driver().cuGraphLaunch(self.exec, stream), "cuGraphLaunch")

    def close(self) -> None:
        cu = _driver()
        if self.exec is not None:
            cu.cuGraphExecDestroy(self.exec)
            self.exec = None
        if self.graph is not None:
            cu.cuGraphDestroy(self.graph)
            self.graph = None
