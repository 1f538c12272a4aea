"""`trtkit refit`: new weights into a refittable engine (built with --refittable) through TensorRT's Refitter.

`refit_weights` decides everything with plain code (which ONNX the plan came from, which weights change, their
values: graph/lora.py); applying them is runtime work (runtime/refit.py: the Refitter into a new plan, or at load
from the weights file `trtkit refit -o x.safetensors` writes), which needs the GPU the engine runs on.
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
