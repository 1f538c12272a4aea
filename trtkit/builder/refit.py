"""`trtkit refit`: new weights into a refittable engine (built with --refittable) through TensorRT's Refitter.

`refit_weights` decides everything with plain code (which ONNX the plan came from, which weights change, their
values: graph/lora.py); `refit_plan` is the thin TensorRT call (deserialize, Refitter.set_named_weights,
refit_cuda_engine, serialize), which needs the GPU the engine runs on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trtkit.errors import TrtkitError


@dataclass
class RefitPlan:
    weights: dict[str, np.ndarray]  # ONNX initializer name (= the engine's refittable weight name) -> values
    onnx: Path  # the ONNX the engine was built from
    base: Path  # the float ONNX the fused weights start from
    layers: int  # LoRA layers applied
    skipped: int  # text-encoder keys left out


def refit_weights(meta: dict[str, Any], lora: Path, scale: float = 1.0, base: Path | None = None,
                  skip_text_encoder: bool = False) -> RefitPlan:
    """The weights a LoRA changes in the engine described by `meta` (its metadata JSON): the fused float weights,
    or for a Q/DQ ONNX the re-quantized 8-bit weights and their new scales (from the float `base`)."""
    import onnx
    import onnx_graphsurgeon as gs

    from trtkit.graph.lora import fused_weights, initializers_of, read_adapter, requantized_weights
    from trtkit.graph.patterns import find

    if not (meta.get("settings") or {}).get("refittable"):
        raise TrtkitError("the engine was not built with --refittable; rebuild it with `trtkit build --refittable`")
    built = Path((meta.get("onnx") or {}).get("path") or "")
    if not built.is_file():
        raise TrtkitError(f"the ONNX the engine was built from ({built}) is gone; pass the float ONNX with --base")
    qdq = bool((meta.get("precision") or {}).get("qdq_types"))
    if (meta.get("precision") or {}).get("requested") in ("int8", "fp8") and not _has_qdq(built):
        raise TrtkitError("the engine's Q/DQ graph was made inside `trtkit build` and not kept; quantize with "
                          "`trtkit quantize`, build that ONNX with --refittable, and refit it with --base <float ONNX>")
    base = Path(base) if base is not None else built
    if qdq and base == built:
        raise TrtkitError("an 8-bit engine needs the float ONNX its weights came from: pass --base unet.onnx")
    adapter = read_adapter(lora, text_encoder="skip" if skip_text_encoder else "error")
    fmodel = onnx.load(str(base), load_external_data=False)
    fmatches = find(gs.import_onnx(fmodel))
    fbase = initializers_of(fmodel, base_dir=base.parent)
    if qdq:
        qgraph = gs.import_onnx(onnx.load(str(built)))
        weights = requantized_weights(adapter, qgraph, fmatches, fbase, scale)
    else:
        weights = fused_weights(adapter, fmatches, fbase, scale)
    return RefitPlan(weights, built, base, len(adapter.layers), len(adapter.skipped))


def _has_qdq(path: Path) -> bool:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return any(n.op_type == "DequantizeLinear" for n in m.graph.node)


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


def refit_plan(backend: Any, plan: Path, weights: dict[str, np.ndarray], output: Path) -> int:
    """Deserialize `plan`, set every named weight, refit, write the engine to `output` (atomically); returns how
    many weights were set. Needs a GPU the engine runs on."""
    from trtkit._files import write_bytes_atomic

    trt = backend.trt
    engine = trt.Runtime(backend.logger).deserialize_cuda_engine(Path(plan).read_bytes())
    if engine is None:
        raise TrtkitError(f"{trt.__name__} could not load {plan} here; a refit needs the GPU the engine runs on")
    if not engine.refittable:
        raise TrtkitError(f"{plan} is not refittable; rebuild it with `trtkit build --refittable`")
    refitter = trt.Refitter(engine, backend.logger)
    named = engine_weights(weights, set(refitter.get_all_weights()))
    kept = []  # TensorRT reads the arrays at refit_cuda_engine(): they must live until then
    for name, w in named.items():
        arr = np.ascontiguousarray(w)
        kept.append(arr)
        if not refitter.set_named_weights(name, trt.Weights(arr)):
            raise TrtkitError(f"TensorRT refused the new weight {name} {arr.dtype}{list(arr.shape)}")
    if not refitter.refit_cuda_engine():
        raise TrtkitError("TensorRT's refit failed (a rewrite that assumed equal Q/DQ scales, or missing weights)")
    write_bytes_atomic(output, bytes(engine.serialize()))
    return len(kept)
