"""The scale arithmetic of the Q/DQ pass, following the TensorRT conventions: INT8 symmetric, scale
amax/127, zero point 0; FP8 E4M3, scale amax/448, FLOAT8E4M3FN zero points (opset 19). Weights per
output channel, activations per tensor; scales stored FP16-representable when the graph goes FP16."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from trtkit.errors import TrtkitError
from trtkit.graph.patterns import AttentionMatch

QMAX = {"int8": 127.0, "fp8": 448.0}
ONNX_QTYPE = {"int8": onnx.TensorProto.INT8, "fp8": onnx.TensorProto.FLOAT8E4M3FN}
FP16_MIN_NORMAL = 2.0**-14  # scales stored in FP16 must stay normal


def round_scale(scale: np.ndarray, fp16: bool) -> np.ndarray:
    """Scales as stored: float32, FP16-representable (and normal) when the graph goes FP16, so the
    conversion to FP16 later changes nothing."""
    s = np.asarray(scale, dtype=np.float32)
    if fp16:
        s = np.maximum(s, FP16_MIN_NORMAL).astype(np.float16).astype(np.float32)
    else:
        s = np.maximum(s, 1e-12).astype(np.float32)
    return np.asarray(s, dtype=np.float32)


def act_scale(amax: float, precision: str, fp16: bool) -> np.ndarray:
    return round_scale(np.array(max(float(amax), 0.0) / QMAX[precision], np.float32), fp16)


def quantize_weight(w: np.ndarray, axis: int, precision: str, fp16: bool) -> tuple[np.ndarray, np.ndarray]:
    """(8-bit weight as raw-typed numpy: int8, or uint8 bytes of E4M3, per-channel float32 scale)."""
    w = np.asarray(w, dtype=np.float32)
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=red) if red else np.abs(w)
    scale = round_scale(amax / QMAX[precision], fp16)
    shape = [1] * w.ndim
    shape[axis] = -1
    x = w / scale.reshape(shape)
    if precision == "int8":
        return np.clip(np.rint(x), -128, 127).astype(np.int8), scale
    try:
        import ml_dtypes
    except ImportError as e:  # onnx >= 1.18 brings it
        raise TrtkitError("FP8 weights need the ml_dtypes package; pip install ml_dtypes") from e

    return np.clip(x, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn).view(np.uint8), scale


def dequantize_weight(q: np.ndarray, scale: np.ndarray, axis: int, precision: str) -> np.ndarray:
    """The reference of what DequantizeLinear computes (tests use it)."""
    if precision == "int8":
        x = q.astype(np.float32)
    else:
        import ml_dtypes

        x = q.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    shape = [1] * q.ndim
    shape[axis] = -1
    return x * scale.reshape(shape)


def typed_const(name: str, data: np.ndarray, precision: str) -> gs.Constant:
    """An INT8 / FP8 initializer as a TensorProto wrapped for graphsurgeon (which has no FP8 numpy type)."""
    proto = onnx.helper.make_tensor(name, ONNX_QTYPE[precision], list(data.shape),
                                    vals=np.ascontiguousarray(data).tobytes(), raw=True)
    return gs.Constant(name, LazyValues(proto))



def prescale_factor(nodes: dict[str, gs.Node], a: AttentionMatch, role: str) -> float:
    """Calibration ranges of q_bmm/k_bmm are of the query/key as the attention gets them (as
    ModelOpt's quantizers see them); the SDPA export multiplies each by scale**0.5 = head**-0.25
    before the first BMM, and Q/DQ sits after that Mul so the DQ feeds the BMM directly."""
    mul = a.q_prescale if role == "q_bmm" else a.k_prescale if role == "k_bmm" else None
    if mul is None or a.head_size is None:
        return 1.0
    n = nodes[mul]
    c = next((t for t in n.inputs if isinstance(t, gs.Constant)), None)
    if c is not None and c.values.size == 1:
        return abs(float(np.asarray(c.values).reshape(-1)[0]))
    return float(a.head_size) ** -0.25

