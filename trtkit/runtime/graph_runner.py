"""The denoising loop on preallocated buffers: eager, or all N steps (UNet + guidance + scheduler) as ONE
CUDA graph.

Phases: `warmup()` runs the loop once eagerly (first-call allocations, torch.compile, TensorRT's lazy
setup stay out of the capture); `capture()` records init + N x (UNet, fused step, advance) into one
graph; `replay()` launches it. The runner records what a capture baked in (shapes, every buffer address,
the executor's fingerprint, the number of steps and the scheduler family) and re-captures when any of it
changes; values that live in device memory (latents, conditioning, guidance, tables, noise) change
without a new capture. Errors it cannot fix are named: GraphCaptureError, GraphMismatchError.

On a CPU the same loop runs eagerly with the numpy reference of the fused kernel.

Capture API: the TensorRT executor is captured with cuda-python's cuStreamBeginCapture on our stream;
the torch executor with torch.cuda.graph, because torch's caching allocator must know about the capture
(its private graph pool) or memory freed after capture would be reused under the graph.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from trtkit.errors import TrtkitError
from trtkit.runtime.executors import UNET_OUTPUT, LoopShape, StepExecutor
from trtkit.runtime.host_dtypes import decode, encode, storage_dtype
from trtkit.runtime.schedulers import LoopState, StepTables, reference_step

log = logging.getLogger(__name__)


class GraphCaptureError(TrtkitError):
    """Capturing the loop failed (something in it is not capturable, e.g. a host synchronisation)."""


class GraphMismatchError(TrtkitError):
    """A replay was asked for with shapes or addresses the captured graph does not have, and the runner
    was told not to re-capture (or the executor moved its buffers during capture)."""


@dataclass(frozen=True)
class CaptureKey:
    shape: LoopShape
    steps: int
    family: str
    spec: Any
    addresses: tuple[tuple[str, int], ...]
    fingerprint: tuple


class _CpuLoop:
    """numpy buffers; the fused kernel's math from schedulers.reference_step. A bfloat16 executor's buffers
    hold its bits in uint16 (numpy has no bfloat16), encoded / decoded as the device loop's uploads are."""

    def __init__(self, executor: StepExecutor, shape: LoopShape, tables: StepTables) -> None:
        self.executor, self.shape, self.tables = executor, shape, tables
        self.io_dtype = executor.io_dtype
        dt = storage_dtype(self.io_dtype)
        self.spec = loop_io(executor, shape, tables.steps)
        self.io = {k: np.zeros(s, np.float32 if kind == "f32" else dt) for k, (s, kind) in self.spec.items()}
        self.step = np.zeros(1, np.int32)
        self.x_init = np.zeros(shape.latent, np.float32)
        self.x = np.zeros(shape.latent, np.float32)
        self.noise: np.ndarray | None = None
        self.guidance = 1.0
        executor.bind({**self.io, "step": self.step} if executor.reads_step else self.io)

    def set(self, name: str, value: Any) -> None:
        if name == "x_init":
            self.x_init[...] = value
        elif name == "noise":
            self.noise = None if value is None else np.asarray(value, np.float32)
        elif name == "guidance":
            self.guidance = float(value)
        else:
            self.io[name][...] = encode(_host(value), "float32" if self.spec[name][1] == "f32" else self.io_dtype)

    def run(self) -> None:
        tab, sh = self.tables, self.shape
        state = LoopState(x=self.x_init.copy(), x0_prev=np.zeros_like(self.x_init))
        reps = 2 if sh.cfg else 1
        for i in range(tab.steps):
            self.io["sample"][...] = encode(np.concatenate([state.x * tab.in_scale[i]] * reps), self.io_dtype)
            self.io["timestep"][0] = tab.timesteps[i]
            self.step[0] = i
            self.executor(0)
            reference_step(tab, i, state, decode(self.io[UNET_OUTPUT], self.io_dtype), self.guidance, sh.cfg,
                           None if self.noise is None else self.noise[i])
        self.x[...] = state.x

    def result(self) -> np.ndarray:
        return self.x.copy()


def loop_io(executor: StepExecutor, shape: LoopShape, steps: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """The buffers a loop binds: the UNet's, then what the executor reads besides (StepExecutor.extra_io)."""
    return {**shape.unet_io(), **executor.extra_io(shape, steps)}


def _host(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value)


class _DeviceLoop:
    """Device buffers (cuda-python), the NVRTC kernels, and the loop body enqueued on one stream."""

    def __init__(self, executor: StepExecutor, shape: LoopShape, tables: StepTables, stream: Any) -> None:
        from trtkit.runtime import cuda
        from trtkit.runtime.kernels import KernelSpec, LoopPointers, get_kernels

        self.executor, self.shape, self.tables, self.stream = executor, shape, tables, stream
        io_dt = storage_dtype(executor.io_dtype)  # bfloat16 lives in uint16 buffers
        n = int(np.prod(shape.latent))
        E = cuda.DeviceArray.empty
        self.spec = loop_io(executor, shape, tables.steps)
        self.io = {k: E(s, np.float32 if kind == "f32" else io_dt) for k, (s, kind) in self.spec.items()}
        self.x_init = E(shape.latent, np.float32)
        self.x = E(shape.latent, np.float32)
        self.x0_prev = E(shape.latent, np.float32)
        self.noise = E((tables.steps if tables.uses_noise else 1, n), np.float32)
        self.table = E((11, tables.steps + 1), np.float32)
        self.params = E((4,), np.float32)
        self.counter = E((1,), np.int32)
        self.table.upload(tables.packed(), self.handle)
        self.kernels = get_kernels(KernelSpec.for_tables(tables, executor.io_dtype, cuda.compute_capability()))
        self.ptrs = LoopPointers(
            x_init=self.x_init.ptr, x=self.x.ptr, x0_prev=self.x0_prev.ptr, noise=self.noise.ptr,
            sample=self.io["sample"].ptr, noise_pred=self.io[UNET_OUTPUT].ptr, timestep=self.io["timestep"].ptr,
            counter=self.counter.ptr, table=self.table.ptr, params=self.params.ptr, n=n, np1=tables.steps + 1,
            cfg=int(shape.cfg))
        self.bytes = sum(a.nbytes for a in self.arrays().values())
        self.noise_ready = not tables.uses_noise  # an ancestral loop must never read an unwritten noise table
        executor.bind({**self.io, "step": self.counter} if executor.reads_step else self.io)

    @property
    def handle(self) -> int:
        return int(self.stream.cuda_stream if hasattr(self.stream, "cuda_stream") else self.stream.handle)

    def arrays(self) -> dict[str, Any]:
        return {**self.io, "x_init": self.x_init, "x": self.x, "x0_prev": self.x0_prev, "noise": self.noise,
                "table": self.table, "params": self.params, "counter": self.counter}

    def addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple(sorted((k, a.ptr) for k, a in self.arrays().items()))

    def set(self, name: str, value: Any) -> None:
        if name == "guidance":
            self.params.upload(np.array([value, 0, 0, 0], np.float32), self.handle)
        elif name == "noise":
            if value is not None and self.tables.uses_noise:
                self.noise.upload(np.asarray(value, np.float32).reshape(self.noise.shape), self.handle)
                self.noise_ready = True
        elif name == "x_init":
            self.x_init.upload(_host(value).astype(np.float32), self.handle)
        else:
            arr = self.io[name]
            v = _host(value)
            if tuple(v.shape) != arr.shape:
                raise TrtkitError(f"{name}: got shape {tuple(v.shape)}, the loop was set up for {arr.shape}")
            kind = self.spec[name][1]
            arr.upload(encode(v, "float32" if kind == "f32" else self.executor.io_dtype), self.handle)

    def body(self) -> None:
        h = self.handle
        k, p = self.kernels, self.ptrs
        k.launch_init(p, h)
        for _ in range(self.tables.steps):
            self.executor(h)
            k.launch_step(p, h)
            k.launch_advance(p, h)

    def result(self) -> np.ndarray:
        return self.x.download(self.handle)


class LoopRunner:
    """Runs the loop for one executor; `use_graph` picks one captured graph over eager launches.

    `recapture=False` turns a change of what the graph baked in into GraphMismatchError instead of a new
    capture (for callers that must not pay a capture in a latency-critical path).
    """

    def __init__(self, executor: StepExecutor, device: str = "cuda", use_graph: bool = True,
                 recapture: bool = True) -> None:
        self.executor = executor
        self.device = device
        self.use_graph = use_graph and device == "cuda"
        self.recapture = recapture
        self.loop: Any = None
        self.graph: Any = None
        self.key: CaptureKey | None = None
        self.captures = 0
        self.warmed: set[CaptureKey] = set()
        self.stream: Any = None
        if device == "cuda":
            from trtkit.runtime import cuda

            cuda.init()
            if executor.uses_torch_stream:
                import torch

                self.stream = torch.cuda.Stream()
            else:
                self.stream = cuda.Stream()

    # -- setup -----------------------------------------------------------------------------------
    def prepare(self, shape: LoopShape, tables: StepTables) -> None:
        """(Re)allocate the buffers when the shape or the number of steps / family changes."""
        self.executor.refresh()
        self.executor.check_shape(shape)
        tables = self.executor.adapt_tables(tables)
        cur = self.loop
        if cur is not None and cur.shape == shape and cur.tables.steps == tables.steps \
                and cur.tables.family == tables.family and cur.tables.clip == tables.clip:
            if self.device == "cuda":
                cur.table.upload(tables.packed(), cur.handle)  # new values, same addresses: no capture
            cur.tables = tables
            return
        if self.device == "cuda":
            self._sync()
            self.loop = _DeviceLoop(self.executor, shape, tables, self.stream)
        else:
            self.loop = _CpuLoop(self.executor, shape, tables)

    def set_inputs(self, **values: Any) -> None:
        """x_init (initial latents, already times init_noise_sigma), guidance, noise, and the UNet
        conditioning (encoder_hidden_states, text_embeds, time_ids): copied INTO the bound buffers."""
        if self.loop is None:
            raise TrtkitError("LoopRunner.prepare(shape, tables) must come before set_inputs")
        for k, v in values.items():
            self.loop.set(k, v)

    # -- phases ----------------------------------------------------------------------------------
    def _ctx(self) -> Any:
        if self.device == "cuda" and self.executor.uses_torch_stream:
            import torch

            return torch.cuda.stream(self.stream)
        return contextlib.nullcontext()

    def _sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def eager(self) -> None:
        with self._ctx():
            self.loop.run() if self.device != "cuda" else self.loop.body()

    def warmup(self) -> None:
        self.eager()
        self._sync()
        self.warmed.add(self._current_key())

    def _current_key(self) -> CaptureKey:
        lp = self.loop
        return CaptureKey(lp.shape, lp.tables.steps, lp.tables.family, getattr(lp, "kernels", None) and
                          lp.kernels.spec, lp.addresses() if hasattr(lp, "addresses") else (),
                          self.executor.fingerprint())

    def capture(self) -> None:
        key = self._current_key()
        if key not in self.warmed:
            self.warmup()
        self._release_graph()
        if self.executor.uses_torch_stream:
            import torch

            g: Any = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(g, stream=self.stream):
                    self.loop.body()
            except Exception as e:
                raise GraphCaptureError(f"capturing the loop failed: {type(e).__name__}: {str(e).splitlines()[0]}",
                                        hint="run with --no-cuda-graph; something in the UNet synchronises "
                                             "with the host or allocates outside the graph pool") from e
        else:
            from trtkit.runtime.cuda import CudaGraph

            g = CudaGraph()
            g.begin(self.stream)
            try:
                self.loop.body()
                g.end(self.stream)
            except Exception as e:
                g.abort(self.stream)
                raise GraphCaptureError(f"capturing the loop failed: {type(e).__name__}: {str(e).splitlines()[0]}",
                                        hint="run with --no-cuda-graph") from e
        after = self._current_key()
        if after != key:
            raise GraphMismatchError("the executor moved its buffers or weights while being captured")
        self.graph, self.key = g, key
        self.captures += 1

    def replay(self) -> None:
        key = self._current_key()
        if self.graph is None or key != self.key:
            if self.graph is not None and not self.recapture:
                raise GraphMismatchError(f"captured graph does not match: {_diff(self.key, key)}",
                                         hint="allow re-capture or keep shapes and buffers fixed")
            if not self.executor.uses_torch_stream and not self.executor.capturable(self.loop.handle):
                # TensorRT-RTX says this context would allocate or compile under capture: run eagerly from now on
                log.warning("the %s UNet cannot be captured in a CUDA graph here (is_stream_capturable is false); "
                            "running the loop without one", self.executor.name)
                self._release_graph()
                self.use_graph = False
                self.eager()
                return
            self.capture()
        if self.executor.uses_torch_stream:
            with self._ctx():
                self.graph.replay()
        else:
            self.graph.launch(self.loop.handle)

    def run(self) -> None:
        """The loop once, graph or eager as configured (enqueued; `result()` waits)."""
        if self.loop is None:
            raise TrtkitError("LoopRunner.prepare(shape, tables) must come before run")
        if not getattr(self.loop, "noise_ready", True):
            raise TrtkitError(f"scheduler {self.loop.tables.family} needs noise (set_inputs(noise=...))")
        if self.use_graph:
            self.replay()
        else:
            self.eager()

    def result(self) -> np.ndarray:
        self._sync()
        return self.loop.result()

    def __call__(self, shape: LoopShape, tables: StepTables, **inputs: Any) -> np.ndarray:
        self.prepare(shape, tables)
        self.set_inputs(**inputs)
        self.run()
        return self.result()

    def _release_graph(self) -> None:
        if self.graph is not None and hasattr(self.graph, "close"):
            self.graph.close()
        self.graph = None

    def close(self) -> None:
        self._sync()
        self._release_graph()
        self.loop = None


def _diff(a: CaptureKey | None, b: CaptureKey) -> str:
    if a is None:
        return "nothing captured"
    parts = []
    if a.shape != b.shape:
        parts.append(f"shape {a.shape} -> {b.shape}")
    if a.steps != b.steps or a.family != b.family:
        parts.append(f"scheduler {a.family}/{a.steps} -> {b.family}/{b.steps}")
    if a.addresses != b.addresses:
        moved = [k for (k, p), (_, q) in zip(a.addresses, b.addresses, strict=False) if p != q]
        parts.append(f"buffer addresses changed ({', '.join(moved) or 'set'})")
    if a.fingerprint != b.fingerprint:
        parts.append("executor weights/addresses changed")
    return "; ".join(parts) or "spec changed"
