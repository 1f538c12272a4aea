"""New weights into a refittable engine through TensorRT's Refitter (runtime work: the weights come computed, by
`trtkit refit`'s numpy code in graph/lora.py, as a dict or as the weights file `trtkit refit -o x.safetensors`
writes), either when a plan is loaded (`trtkit run --engines DIR --lora weights.safetensors`) or into a new plan
(`trtkit refit`). Needs the GPU the engine runs on; everything before `set_named_weights` is plain code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from trtkit.errors import TrtkitError

WEIGHTS_FORMAT = "trtkit-refit-weights/1"  # the safetensors metadata key "format" of a weights file


def engine_weights(weights: dict[str, np.ndarray], known: set[str]) -> dict[str, np.ndarray]:
    """The ONNX initializer names of `weights` as the engine names them: the same name, or the `<name>_fp16` copy
    that trtkit's FP16 conversion (graph/fp16.py) made inside `trtkit build --fp16` (values cast to float16).
    A name found neither way is a one-line error."""
    out: dict[str, np.ndarray] = {}
    missing = []
    for name, w in weights.items():
        if name in known:
            out[name] = w
        elif f"{name}_fp16" in known and w.dtype.kind == "f":
            out[f"{name}_fp16"] = w.astype(np.float16)
        else:
            missing.append(name)
    if missing:
        raise TrtkitError(f"{len(missing)} weight(s) are not refittable weights of the engine, e.g. {missing[0]}",
                          hint="refit from the ONNX the engine was built from (--base)")
    return out


def write_weights(path: Path, weights: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    """A weights file: safetensors (numpy arrays by engine weight name), `info` as JSON in its metadata."""
    from safetensors.numpy import save

    from trtkit._files import write_bytes_atomic

    arrays = {k: np.ascontiguousarray(v) for k, v in weights.items()}
    write_bytes_atomic(path, save(arrays, metadata={"format": WEIGHTS_FORMAT, "info": json.dumps(info)}))


def read_weights(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """(weights, info) of a weights file; None for any other safetensors file (e.g. a LoRA adapter)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != WEIGHTS_FORMAT:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(meta.get("info") or "{}")  # noqa: SIM118
    except Exception as e:
        raise TrtkitError(f"{path}: not a safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def refit_engine(trt: Any, logger: Any, engine: Any, weights: dict[str, np.ndarray], name: str) -> int:
    """Set every named weight of a deserialized `engine` and refit it in place; returns how many were set."""
    if not engine.refittable:
        raise TrtkitError(f"{name} is not refittable; rebuild it with `trtkit build --refittable`")
    refitter = trt.Refitter(engine, logger)
    named = engine_weights(weights, set(refitter.get_all_weights()))
    kept = []  # TensorRT reads the arrays at refit_cuda_engine(): they must live until then
    for wname, w in named.items():
        arr = np.ascontiguousarray(w)
        kept.append(arr)
        if not refitter.set_named_weights(wname, trt.Weights(arr)):
            raise TrtkitError(f"TensorRT refused the new weight {wname} {arr.dtype}{list(arr.shape)}")
    if not refitter.refit_cuda_engine():
        raise TrtkitError("TensorRT's refit failed (a rewrite that assumed equal Q/DQ scales, or missing weights)")
    return len(kept)


def refit_plan(backend: Any, plan: Path, weights: dict[str, np.ndarray], output: Path) -> int:
    """Deserialize `plan`, refit it, write the engine to `output` (atomically); returns how many weights were set."""
    from trtkit._files import write_bytes_atomic

    trt = backend.trt
    engine = trt.Runtime(backend.logger).deserialize_cuda_engine(Path(plan).read_bytes())
    if engine is None:
        raise TrtkitError(f"{trt.__name__} could not load {plan} here; a refit needs the GPU the engine runs on")
    n = refit_engine(trt, backend.logger, engine, weights, str(plan))
    write_bytes_atomic(output, bytes(engine.serialize()))
    return n
