"""Host arrays <-> the bits an engine's I/O tensor holds on the device.

numpy has no bfloat16 / float8 and TensorRT's `nptype` maps neither, so such tensors live in uint16 / uint8
device buffers and the host encodes real float values into their bits (round to nearest even, as ml_dtypes
and TensorRT's own casts do) and decodes them back. The loop's bf16 conditioning (graph_runner) and
Engine.infer share these functions (finding 5: a plain integer cast turned 0.7 into 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Device storage of each runtime dtype name (plan.TRT_DTYPES values).
_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "float8_e4m3fn": np.uint8,
            "int8": np.int8, "uint8": np.uint8, "int32": np.int32, "int64": np.int64, "bool": np.bool_}


def _ml(dtype: str) -> Any:
    import ml_dtypes

    return {"bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn}[dtype]


def storage_dtype(dtype: str) -> np.dtype:
    if dtype not in _STORAGE:
        from trtkit.runtime.plan import EngineError

        raise EngineError(f"no host storage for engine dtype {dtype}")
    return np.dtype(_STORAGE[dtype])


def encode(values: Any, dtype: str) -> np.ndarray:
    """Host values -> an array of `storage_dtype(dtype)` holding the engine's bits."""
    if dtype in ("bfloat16", "float8_e4m3fn"):
        return np.ascontiguousarray(np.asarray(values, np.float32).astype(_ml(dtype)).view(storage_dtype(dtype)))
    return np.ascontiguousarray(np.asarray(values).astype(storage_dtype(dtype), copy=False))


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Downloaded storage -> values: bfloat16 / float8 as float32, everything else as it is."""
    if dtype in ("bfloat16", "float8_e4m3fn"):
        return np.asarray(raw).view(_ml(dtype)).astype(np.float32)
    return np.asarray(raw)
