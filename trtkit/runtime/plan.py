"""What a TensorRT plan is, as plain data, and every runtime decision made from it.

An `EngineDesc` (I/O names, dtypes, shapes, every optimization profile) comes either from the plan's `x.json`
(written at build time by trtkit/builder/metadata.py) or from the deserialized engine (engine.py fills it).
The functions here decide, without TensorRT: which backend runs a plan, which profile covers a call's shapes,
the shape of each preallocated buffer, how the shared activation area grows, and which log lines an error quotes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trtkit.errors import TrtkitError

Shape = tuple[int, ...]

# TensorRT DataType member name (upper case; x.json stores it lower case) -> the runtime's dtype name.
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
              "INT8": "int8", "UINT8": "uint8", "BOOL": "bool", "FP8": "float8_e4m3fn"}
# Sub-byte and block-scale types: no numpy storage, and no diffusion pipeline feeds or reads them.
UNSUPPORTED_IO = {"INT4": "int4", "FP4": "fp4", "E8M0": "e8m0"}
BACKEND_MODULES = {"tensorrt": "trt", "tensorrt_rtx": "rtx", "trt": "trt", "rtx": "rtx"}


class EngineError(TrtkitError):
    """An engine cannot be loaded or run as asked."""


def dtype_name(trt_name: str) -> str:
    """`DataType.HALF.name` or x.json's "half" -> "float16"; unknown names pass through lower-cased."""
    up = str(trt_name).split(".")[-1].upper()
    return TRT_DTYPES.get(up) or UNSUPPORTED_IO.get(up) or up.lower()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    is_input: bool
    dtype: str  # a TRT_DTYPES value (or an UNSUPPORTED_IO one, refused by check_supported)
    shape: Shape  # -1 marks a dynamic dimension


@dataclass(frozen=True)
class ProfileSpec:
    name: str
    ranges: dict[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)  # input -> (min, opt, max)


@dataclass(frozen=True)
class EngineDesc:
    name: str
    tensors: tuple[TensorSpec, ...]
    profiles: tuple[ProfileSpec, ...] = ()
    backend: str | None = None  # "trt" | "rtx", where known

    @property
    def inputs(self) -> list[str]:
        return [t.name for t in self.tensors if t.is_input]

    @property
    def outputs(self) -> list[str]:
        return [t.name for t in self.tensors if not t.is_input]

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise EngineError(f"{self.name} has no tensor {name}", hint=f"tensors: {', '.join(t.name for t in self.tensors)}")

    @classmethod
    def from_metadata(cls, doc: Mapping[str, Any], name: str) -> EngineDesc:
        """From a plan's x.json: io {inputs, outputs: [{name, shape, dtype}]}, profiles [{name, shapes}]."""
        io = doc.get("io") or {}
        tensors = tuple(TensorSpec(t["name"], kind == "inputs", dtype_name(t["dtype"]), tuple(t["shape"]))
                        for kind in ("inputs", "outputs") for t in io.get(kind, []))
        profiles = tuple(ProfileSpec(p.get("name", str(i)), {
            n: (tuple(r["min"]), tuple(r["opt"]), tuple(r["max"])) for n, r in p.get("shapes", {}).items()})
            for i, p in enumerate(doc.get("profiles") or []))
        backend = (doc.get("backend") or {}).get("name") if isinstance(doc.get("backend"), dict) else None
        return cls(name, tensors, profiles, BACKEND_MODULES.get(backend or ""))


def fmt(d: Iterable[int] | None) -> str:
    return "x".join(str(v) for v in d) if d is not None else "?"


# -- what an engine may be asked ----------------------------------------------------------------------


def check_supported(desc: EngineDesc) -> None:
    """Finding 11: INT4 / FP4 / E8M0 I/O has no host encoding here; refuse it at load with one line."""
    bad = [f"{t.name} ({t.dtype})" for t in desc.tensors if t.dtype in UNSUPPORTED_IO.values()]
    if bad:
        raise EngineError(f"{desc.name}: engine I/O in {', '.join(bad)} is not supported by the trtkit runtime",
                          hint="export the model with float16/float32 inputs and outputs")


def check_names(desc: EngineDesc, shapes: Mapping[str, Shape]) -> None:
    """Every input named once, ranks and fixed dimensions as the engine has them."""
    inputs = {t.name: t for t in desc.tensors if t.is_input}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise EngineError(f"{desc.name} has no input {', '.join(unknown)}", hint=f"inputs: {', '.join(inputs)}")
    missing = sorted(set(inputs) - set(shapes))
    if missing:
        raise EngineError(f"{desc.name} input {', '.join(missing)} not given")
    for name, t in inputs.items():
        s = tuple(int(v) for v in shapes[name])
        if len(s) != len(t.shape):
            raise EngineError(f"{desc.name} input {name}: rank {len(s)} ({fmt(s)}), the engine takes rank "
                              f"{len(t.shape)} ({fmt(t.shape)})")
        for i, (v, e) in enumerate(zip(s, t.shape, strict=True)):
            if e != -1 and v != e:
                raise EngineError(f"{desc.name} input {name}: {fmt(s)} but dimension {i} is fixed to {e} "
                                  f"({fmt(t.shape)})")


def _covers(p: ProfileSpec, shapes: Mapping[str, Shape]) -> bool:
    for n, (lo, _, hi) in p.ranges.items():
        s = shapes.get(n)
        if s is not None and not (len(s) == len(lo) and all(a <= v <= b for v, a, b in zip(s, lo, hi, strict=True))):
            return False
    return True


def covering_profiles(desc: EngineDesc, shapes: Mapping[str, Shape]) -> list[int]:
    return [k for k, p in enumerate(desc.profiles) if _covers(p, shapes)]


def pick_profile(desc: EngineDesc, shapes: Mapping[str, Shape]) -> int:
    """Finding 2: the first optimization profile whose min..max covers every input of the call."""
    shapes = {n: tuple(int(v) for v in s) for n, s in shapes.items()}
    check_names(desc, shapes)
    if not desc.profiles:  # a static engine: check_names checked every dimension
        return 0
    found = covering_profiles(desc, shapes)
    if found:
        return found[0]
    # name the first input each profile rejects, with its range
    parts = []
    for p in desc.profiles:
        for n, (lo, _, hi) in p.ranges.items():
            if not _covers(ProfileSpec(p.name, {n: (lo, lo, hi)}), shapes):
                parts.append(f"{p.name}: {n} min {fmt(lo)}, max {fmt(hi)}")
                break
    call = ", ".join(f"{n} {fmt(s)}" for n, s in shapes.items())
    raise EngineError(f"{desc.name}: no optimization profile covers {call} ({'; '.join(parts)})",
                      hint="build the engine with a profile that covers this shape")


def max_input_shapes(desc: EngineDesc) -> dict[str, Shape]:
    """Each input's buffer shape: the element-wise max of its profiles' max shapes (its own shape if static)."""
    out: dict[str, Shape] = {}
    for t in desc.tensors:
        if t.is_input:
            maxes = [p.ranges[t.name][2] for p in desc.profiles if t.name in p.ranges]
            out[t.name] = max_over([{t.name: s} for s in maxes])[t.name] if maxes else t.shape
    return out


def max_over(per_profile: Sequence[Mapping[str, Shape]]) -> dict[str, Shape]:
    """Element-wise max of each tensor's shape over profiles: a buffer that holds every profile's tensor."""
    out: dict[str, Shape] = {}
    for shapes in per_profile:
        for n, s in shapes.items():
            s = tuple(int(v) for v in s)
            out[n] = s if n not in out else tuple(max(a, b) for a, b in zip(out[n], s, strict=True))
    return out


def nbytes(shape: Shape, dtype: str) -> int:
    from trtkit.runtime.host_dtypes import storage_dtype

    return int(np.prod(shape, dtype=np.int64)) * storage_dtype(dtype).itemsize


# -- which backend runs a plan -------------------------------------------------------------------------


def choose_backend(plan_name: str, header_flavour: str | None, meta_backend: str | None,
                   requested: str | None) -> str:
    """Finding 3: the plan says who built it (header magic `ftrt`/`vtrt`, else x.json's backend); a request
    that contradicts it is a one-line error instead of a deserialization failure."""
    built = header_flavour or BACKEND_MODULES.get(meta_backend or "")
    if requested is not None and built is not None and requested != built:
        who = {"trt": "TensorRT", "rtx": "TensorRT-RTX"}
        raise EngineError(f"{plan_name} was built by {who[built]}; backend {requested} cannot run it",
                          hint=f"use --backend {built} (or leave --backend unset)")
    choice = requested or built
    if choice is None:
        raise EngineError(f"cannot tell which TensorRT built {plan_name} (no plan header or x.json backend)",
                          hint="pass --backend trt or --backend rtx")
    return choice


# -- the shared activation area ------------------------------------------------------------------------


def area_after(size: int, need: int) -> int:
    """Finding 12: the shared area's size after attaching an engine that needs `need` bytes (0 is allowed:
    such a context gets a null pointer until some engine needs memory)."""
    return max(size, int(need))


# -- log lines an error quotes -------------------------------------------------------------------------


def error_lines(messages: Sequence[tuple[int, str]], last: int = 3) -> list[str]:
    """Finding 7: the last ERROR-level TensorRT messages (logging levels), not INFO/VERBOSE noise."""
    return [m for lvl, m in messages if lvl >= logging.ERROR][-last:]
