"""The fused guidance + scheduler-step kernel, compiled at run time with NVRTC (cuda-python).

One kernel source, specialised per scheduler family by preprocessor flags (which terms of the update
exist: eps for DDIM, the previous x0 for DPM-Solver++ 2M, noise for Euler ancestral, a clamp for DDIM's
clip_sample), so each family compiles to its own kernel without dead loads. Per-step values come from the
packed table (schedulers.StepTables.packed) indexed by a step counter that lives in device memory, so the
host never writes anything between steps and all N steps can be captured in one graph.

Three kernels make the loop (UNet calls between them):
    init     x = x_init; x0_prev = 0; sample = x * in_scale[0] (both CFG halves); counter = 0; t = ts[0]
    step     guidance combine + scheduler update of step counter[0]; writes x and the next UNet input
    advance  counter += 1; t = ts[counter]     (one thread: a separate launch, so no block reads a
             counter another block has already moved)
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from trtkit.runtime import cuda
from trtkit.runtime.cuda import CudaError, check
from trtkit.runtime.schedulers import ROW, StepTables

_SOURCE = r"""
typedef unsigned short u16;
__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float(((unsigned)h) << 16); }
__device__ __forceinline__ u16 f2bf(float f) { u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }

#if IO_DTYPE == 0
typedef float io_t;
#define LD(p, i) ((p)[i])
#define ST(p, i, v) ((p)[i] = (v))
#elif IO_DTYPE == 1
typedef u16 io_t;
#define LD(p, i) h2f((p)[i])
#define ST(p, i, v) ((p)[i] = f2h(v))
#else
typedef u16 io_t;
#define LD(p, i) bf2f((p)[i])
#define ST(p, i, v) ((p)[i] = f2bf(v))
#endif

#define T(row, i) tab[(row) * np1 + (i)]

extern "C" __global__ void trtkit_init(const float* __restrict__ x_init, float* __restrict__ x,
                                       float* __restrict__ x0_prev, io_t* __restrict__ sample,
                                       float* __restrict__ timestep, int* __restrict__ counter,
                                       const float* __restrict__ tab, int n, int np1, int cfg) {
    const float s = T(ROW_IN_SCALE, 0);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float v = x_init[i];
        x[i] = v;
        x0_prev[i] = 0.f;
        ST(sample, i, v * s);
        if (cfg) ST(sample, n + i, v * s);
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) { *counter = 0; *timestep = T(ROW_TIMESTEP, 0); }
}

extern "C" __global__ void trtkit_step(const io_t* __restrict__ noise_pred, float* __restrict__ x,
                                       float* __restrict__ x0_prev, const float* __restrict__ noise,
                                       io_t* __restrict__ sample, const float* __restrict__ tab,
                                       const float* __restrict__ params, const int* __restrict__ counter,
                                       int n, int np1, int cfg) {
    const int k = *counter;
    const float g = params[0];
    const float A = T(ROW_A, k), B = T(ROW_B, k), P = T(ROW_P, k), Q = T(ROW_Q, k);
#if HAS_EPS
    const float C = T(ROW_C, k), D = T(ROW_D, k), E = T(ROW_E, k);
#endif
#if HAS_PREV
    const float R = T(ROW_R, k);
#endif
#if HAS_NOISE
    const float S = T(ROW_S, k);
    const float* nz = noise + (long long)k * n;
#endif
    const float s_next = T(ROW_IN_SCALE, k + 1);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float m;
        if (cfg) { const float u = LD(noise_pred, i), c = LD(noise_pred, n + i); m = u + g * (c - u); }
        else { m = LD(noise_pred, i); }
        const float xv = x[i];
        float x0 = A * xv + B * m;
#if CLIP
        x0 = fminf(fmaxf(x0, -CLIP_RANGE), CLIP_RANGE);
#endif
        float xn = P * xv + Q * x0;
#if HAS_EPS
        xn += E * (C * xv + D * m);
#endif
#if HAS_PREV
        xn += R * x0_prev[i];
        x0_prev[i] = x0;
#endif
#if HAS_NOISE
        xn += S * nz[i];
#endif
        x[i] = xn;
        const float si = xn * s_next;
        ST(sample, i, si);
        if (cfg) ST(sample, n + i, si);
    }
}

extern "C" __global__ void trtkit_advance(int* __restrict__ counter, float* __restrict__ timestep,
                                          const float* __restrict__ tab, int np1) {
    const int k = *counter + 1;
    *counter = k;
    *timestep = T(ROW_TIMESTEP, k);
}
"""

IO_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}


@dataclass(frozen=True)
class KernelSpec:
    """What one compiled module is specialised for."""

    family: str
    io_dtype: str  # dtype of the UNet input/output buffers
    uses_eps: bool
    uses_prev: bool
    uses_noise: bool
    clip: float
    arch: tuple[int, int]

    @classmethod
    def for_tables(cls, tables: StepTables, io_dtype: str, arch: tuple[int, int]) -> KernelSpec:
        if io_dtype not in IO_DTYPES:
            raise ValueError(f"io dtype {io_dtype}")
        return cls(tables.family, io_dtype, tables.uses_eps, tables.uses_prev, tables.uses_noise, tables.clip, arch)

    def defines(self) -> list[str]:
        d = {f"ROW_{k.upper()}": v for k, v in ROW.items()}
        d.update(IO_DTYPE=IO_DTYPES[self.io_dtype], HAS_EPS=int(self.uses_eps), HAS_PREV=int(self.uses_prev),
                 HAS_NOISE=int(self.uses_noise), CLIP=int(self.clip > 0))
        out = [f"-D{k}={v}" for k, v in d.items()]
        if self.clip > 0:
            out.append(f"-DCLIP_RANGE={float(self.clip)!r}f")
        return out


def _nvrtc() -> Any:
    from cuda.bindings import nvrtc

    return nvrtc


def compile_ptx_or_cubin(source: str, name: str, options: list[str], arch: tuple[int, int]) -> bytes:
    """NVRTC: CUBIN for this exact GPU (no driver JIT at load), PTX where this NVRTC is older than the GPU."""
    nvrtc = _nvrtc()
    prog = check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture=sm_{arch[0]}{arch[1]}", "--std=c++17", "-default-device", *options]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            size = check(nvrtc.nvrtcGetProgramLogSize(prog))
            log = b" " * size
            check(nvrtc.nvrtcGetProgramLog(prog, log))
            raise CudaError(f"NVRTC failed for {name}: {log.decode(errors='replace').strip()}")
        size = check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        image = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, image), "nvrtcGetCUBIN")
        return image
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


class StepKernels:
    """The three loop kernels of one KernelSpec, loaded into the current context."""

    THREADS = 256

    def __init__(self, spec: KernelSpec) -> None:
        cu = cuda._driver()
        cuda.init()
        self.spec = spec
        self.image = compile_ptx_or_cubin(_SOURCE, f"trtkit_{spec.family}.cu", spec.defines(), spec.arch)
        self.module = check(cu.cuModuleLoadData(self.image), "cuModuleLoadData")
        self.init = check(cu.cuModuleGetFunction(self.module, b"trtkit_init"), "cuModuleGetFunction")
        self.step = check(cu.cuModuleGetFunction(self.module, b"trtkit_step"), "cuModuleGetFunction")
        self.advance = check(cu.cuModuleGetFunction(self.module, b"trtkit_advance"), "cuModuleGetFunction")
        self._sms = cuda.sm_count()

    def _grid(self, n: int) -> int:
        return max(1, min((n + self.THREADS - 1) // self.THREADS, self._sms * 8))

    def _launch(self, fn: Any, grid: int, threads: int, stream: int, args: tuple, types: tuple) -> None:
        cu = cuda._driver()
        check(cu.cuLaunchKernel(fn, grid, 1, 1, threads, 1, 1, 0, stream, (args, types), 0), "cuLaunchKernel")

    def launch_init(self, b: LoopPointers, stream: int) -> None:
        P, Int = ctypes.c_void_p, ctypes.c_int
        self._launch(self.init, self._grid(b.n), self.THREADS, stream,
                     (b.x_init, b.x, b.x0_prev, b.sample, b.timestep, b.counter, b.table, b.n, b.np1, b.cfg),
                     (P, P, P, P, P, P, P, Int, Int, Int))

    def launch_step(self, b: LoopPointers, stream: int) -> None:
        P, Int = ctypes.c_void_p, ctypes.c_int
        self._launch(self.step, self._grid(b.n), self.THREADS, stream,
                     (b.noise_pred, b.x, b.x0_prev, b.noise, b.sample, b.table, b.params, b.counter, b.n, b.np1,
                      b.cfg),
                     (P, P, P, P, P, P, P, P, Int, Int, Int))

    def launch_advance(self, b: LoopPointers, stream: int) -> None:
        P, Int = ctypes.c_void_p, ctypes.c_int
        self._launch(self.advance, 1, 1, stream, (b.counter, b.timestep, b.table, b.np1), (P, P, P, Int))


@dataclass(frozen=True)
class LoopPointers:
    """The device addresses the loop kernels read and write (fixed for the life of a captured graph)."""

    x_init: int
    x: int
    x0_prev: int
    noise: int
    sample: int
    noise_pred: int
    timestep: int
    counter: int
    table: int
    params: int
    n: int  # elements of one latent (C*H*W*batch of one image set)
    np1: int  # steps + 1 (table row length)
    cfg: int


_cache: dict[KernelSpec, StepKernels] = {}


def get_kernels(spec: KernelSpec) -> StepKernels:
    """Compiled once per spec and process (NVRTC takes ~100 ms)."""
    if spec not in _cache:
        _cache[spec] = StepKernels(spec)
    return _cache[spec]
