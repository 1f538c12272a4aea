"""A TensorRT DiT transformer engine (FLUX.1, SD3.x) as a step executor of the loop runner.

What decides something is plain functions over the engine's description (plan.EngineDesc: I/O names, dtypes,
profiles) and the loop's shape (dit_executor.DitLoopShape), tested on the CPU against the exporter's real ONNX
and TensorRT-RTX plan metadata; `DitEngineExecutor` only applies them on engine.Engine (the UNet's shell):
  * `check_engine`: the plan is this family's transformer as trtkit/exporter_dit.py writes it (input names,
    `noise_pred` out, one float dtype for latents / conditioning / output, float32 for the timestep, guidance
    and RoPE ids, which the loop keeps in float32).
  * `bindings`: each engine tensor -> the loop buffer it reads or writes, with the run's shape; the profile
    that covers them is picked here (a one-line EngineError names the input a profile rejects). The engine's
    `timestep` and `guidance` are (B,) while the loop holds one float32 value: for B > 1 the executor owns a
    (B,) buffer (StepExecutor.extra_io) filled with B device copies of that value before each call, which the
    loop graph captures like the engine's own launches (no kernel of ours).
  * `engine_timesteps`: the exporter's wrapper hands the engine's inputs to the transformer's forward as they
    are, so the engine takes what diffusers' pipeline passes: FLUX's t cast to the latents' dtype, divided by
    1000 in that dtype, rounded as torch rounds it on CUDA (the model multiplies by 1000 inside); SD3's t as float32. The loop writes its table's
    timestep row into the timestep buffer, so for FLUX that row holds the already-divided values, rounded as
    DitTorchExecutor rounds them (`adapt_tables`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trtkit.runtime.dit_executor import DitLoopShape
from trtkit.runtime.executors import UNET_OUTPUT, LoopShape, StepExecutor
from trtkit.runtime.plan import EngineDesc, EngineError, Shape, fmt, pick_profile
from trtkit.runtime.schedulers import StepTables

# engine tensor (exporter_dit / profiles_dit names) -> loop buffer (DitLoopShape.unet_io names)
LOOP_NAMES = {"hidden_states": "sample", "encoder_hidden_states": "encoder_hidden_states",
              "pooled_projections": "pooled_projections", "timestep": "timestep", "img_ids": "img_ids",
              "txt_ids": "txt_ids", "guidance": "guidance_in", UNET_OUTPUT: UNET_OUTPUT}
IO_TENSORS = ("hidden_states", "encoder_hidden_states", "pooled_projections", UNET_OUTPUT)  # the engine's dtype
F32_TENSORS = ("timestep", "img_ids", "txt_ids", "guidance")  # float32 in the loop
BROADCAST = ("timestep", "guidance")  # one value in the loop, (B,) for the engine
FLOATS = ("float32", "float16", "bfloat16")
PLAN_NAME = "transformer.plan"


def engine_inputs(family: str, guidance_embed: bool) -> list[str]:
    """The transformer's inputs as exporter_dit writes them, in profiles_dit's order."""
    if family == "flux":
        return ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids"] + (
            ["guidance"] if guidance_embed else [])
    return ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]


def check_engine(desc: EngineDesc, family: str, guidance_embed: bool) -> str:
    """One-line EngineError unless `desc` is this family's transformer engine; returns its I/O dtype."""
    want = engine_inputs(family, guidance_embed)
    if sorted(desc.inputs) != sorted(want) or desc.outputs != [UNET_OUTPUT]:
        extra = sorted(set(desc.inputs) - set(want))
        missing = sorted(set(want) - set(desc.inputs))
        why = "; ".join(p for p in (f"extra {', '.join(extra)}" if extra else "",
                                    f"missing {', '.join(missing)}" if missing else "") if p)
        raise EngineError(f"{desc.name}: I/O {', '.join(desc.inputs)} -> {', '.join(desc.outputs)} is not this "
                          f"{family.upper()} transformer's ({', '.join(want)} -> {UNET_OUTPUT}){': ' + why if why else ''}")
    rank = 3 if family == "flux" else 4
    if len(desc.tensor("hidden_states").shape) != rank:
        raise EngineError(f"{desc.name}: hidden_states has rank {len(desc.tensor('hidden_states').shape)}; a "
                          f"{family.upper()} transformer takes rank {rank}")
    io = {desc.tensor(n).dtype for n in IO_TENSORS}
    if len(io) != 1 or next(iter(io)) not in FLOATS:
        raise EngineError(f"{desc.name}: {', '.join(f'{n} {desc.tensor(n).dtype}' for n in IO_TENSORS)}; the loop "
                          f"needs one of {', '.join(FLOATS)} for all of them")
    bad = [f"{n} is {desc.tensor(n).dtype}" for n in F32_TENSORS if n in desc.inputs
           and desc.tensor(n).dtype != "float32"]
    if bad:
        raise EngineError(f"{desc.name}: {', '.join(bad)}; the loop feeds float32 (export with float32 inputs)")
    return next(iter(io))


@dataclass(frozen=True)
class Binding:
    engine: str  # the engine's tensor
    buffer: str  # the loop buffer bound to it
    shape: Shape  # its shape in this run
    source: str | None = None  # a loop buffer of one value copied into every element of `buffer` before a call


def bindings(desc: EngineDesc, shape: DitLoopShape) -> tuple[Binding, ...]:
    """Every engine tensor bound to a loop buffer of the run's shape; EngineError when no profile covers them."""
    if ("guidance" in desc.inputs) != shape.guidance_embed:
        raise EngineError(f"{desc.name}: the engine {'takes' if 'guidance' in desc.inputs else 'has no'} guidance "
                          f"input, the transformer's guidance_embeds is {shape.guidance_embed}")
    io, b = shape.unet_io(), shape.unet_batch
    out = []
    for n in desc.inputs + desc.outputs:
        loop = LOOP_NAMES.get(n)
        if loop is None or loop not in io:
            raise EngineError(f"{desc.name}: no loop buffer for engine tensor {n}")
        if n in BROADCAST and b != 1:
            out.append(Binding(n, f"engine_{n}", (b,), loop))
        else:
            out.append(Binding(n, loop, io[loop][0]))
    pick_profile(desc, {x.engine: x.shape for x in out if x.engine in desc.inputs})
    return tuple(out)


def owned_buffers(plan: tuple[Binding, ...]) -> dict[str, tuple[Shape, str]]:
    """The (B,) float32 buffers the executor asks the loop for (StepExecutor.extra_io)."""
    return {x.buffer: (x.shape, "f32") for x in plan if x.source is not None}


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to `dtype` (nearest even, as torch's casts) and back to float32."""
    v = np.asarray(values, np.float32)
    if dtype == "float16":
        return v.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        from trtkit.runtime.host_dtypes import decode, encode

        return decode(encode(v, "bfloat16"), "bfloat16")
    if dtype != "float32":
        raise EngineError(f"no timestep rounding for {dtype}")
    return v


def engine_timesteps(timesteps: np.ndarray, family: str, io_dtype: str, device: str = "cuda") -> np.ndarray:
    """The transformer's timestep argument per step, as float32: FLUX `t.to(dtype) / 1000` in `io_dtype`
    (FluxPipeline and DitTorchExecutor), SD3 `t` itself. torch divides by a Python number exactly on the CPU, but
    on CUDA multiplies by the float32 reciprocal (ATen's div_true_kernel_cuda), which can differ in the last bit;
    `device` names the torch run to match (an engine runs beside the CUDA one)."""
    t = np.asarray(timesteps, np.float32)
    if family != "flux":
        return t
    r = round_to(t, io_dtype)
    q = r / np.float32(1000) if device == "cpu" else r * (np.float32(1) / np.float32(1000))
    return round_to(q, io_dtype)


def engine_tables(tables: StepTables, family: str, io_dtype: str, device: str = "cuda") -> StepTables:
    """`tables` whose timestep row holds the engine's timestep input (the scheduler's coefficients unchanged)."""
    return dataclasses.replace(tables, timesteps=engine_timesteps(tables.timesteps, family, io_dtype, device))


def plan_path(engines: Path | str) -> Path:
    """`--engines`: a plan file, or a folder holding transformer.plan (its other plans are not used yet)."""
    p = Path(engines)
    plan = p if p.suffix in (".plan", ".engine") else p / PLAN_NAME
    if not plan.is_file():
        raise EngineError(f"{engines} has no {PLAN_NAME}" if plan is not p else f"engine {p} does not exist",
                          hint="build one with `trtkit build` from `trtkit export MODEL -c transformer`")
    return plan


def load_executor(engines: Path | str, family: str, guidance_embed: bool, trust_engine: bool = False,
                  backend: str | None = None) -> DitEngineExecutor:
    from trtkit.runtime.engine import Engine

    return DitEngineExecutor(Engine.load(plan_path(engines), trust_engine=trust_engine, backend=backend), family,
                             guidance_embed)


def fill(dst: Any, src: Any, stream: int) -> None:
    """Every element of `dst` = the one value of `src`: numpy on the CPU, device copies (capturable) on a GPU."""
    if isinstance(dst, np.ndarray):
        dst[...] = src[0]
        return
    from trtkit.runtime.cuda import copy_bytes

    item = src.nbytes // max(src.size, 1)
    for i in range(dst.size):
        copy_bytes(dst.ptr + i * item, src.ptr, item, stream)


class DitEngineExecutor(StepExecutor):
    """A FLUX / SD3 transformer engine (engine.Engine) on the loop's buffers, execute_async_v3 on its stream."""

    name = "tensorrt"
    uses_torch_stream = False

    def __init__(self, engine: Any, family: str, guidance_embed: bool = False, device: str = "cuda") -> None:
        self.engine, self.family, self.device = engine, family, device  # device: the loop's (tests run "cpu")
        self.io_dtype = check_engine(engine.desc, family, guidance_embed)
        self.plan: tuple[Binding, ...] = ()
        self.fills: list[tuple[Any, Any]] = []

    def check_shape(self, shape: LoopShape) -> None:
        if not isinstance(shape, DitLoopShape) or shape.family != self.family:
            raise EngineError(f"the {self.family} transformer engine needs a {self.family} DitLoopShape")
        self.plan = bindings(self.engine.desc, shape)

    def extra_io(self, shape: LoopShape, steps: int) -> dict[str, tuple[Shape, str]]:
        return owned_buffers(self.plan)

    def adapt_tables(self, tables: StepTables) -> StepTables:
        return engine_tables(tables, self.family, self.io_dtype, self.device)

    def bind(self, arrays: dict[str, Any]) -> None:
        for x in self.plan:  # the loop allocated every buffer at these shapes; a mismatch is a bug here
            if tuple(arrays[x.buffer].shape) != x.shape:  # pragma: no cover
                raise EngineError(f"{x.engine}: loop buffer {fmt(arrays[x.buffer].shape)}, planned {fmt(x.shape)}")
        self.fills = [(arrays[x.buffer], arrays[x.source]) for x in self.plan if x.source is not None]
        self.engine.bind({x.engine: arrays[x.buffer] for x in self.plan})

    def __call__(self, stream: int) -> None:
        for dst, src in self.fills:
            fill(dst, src, stream)
        self.engine.execute(stream)

    def fingerprint(self) -> tuple:
        return tuple(self.engine.fingerprint())

    def capturable(self, stream: int) -> bool:
        return bool(self.engine.capturable(stream))
