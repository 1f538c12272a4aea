"""ONNX files in and out for the graph passes (Q/DQ, FP16): writing with a check, metadata, opset, and
reading constants that may live in an external .data file, one at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from trtkit._files import load_onnx, staged_onnx

__all__ = ["float_values", "has_external", "load_onnx", "materialize_external", "opset", "set_meta", "write_model"]


def opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def set_meta(model: onnx.ModelProto, props: dict[str, str]) -> None:
    del model.metadata_props[:]
    for k, v in props.items():
        e = model.metadata_props.add()
        e.key, e.value = k, v


def write_model(model: onnx.ModelProto | list[onnx.ModelProto], dest: Path, check: bool = True) -> Path:
    """Write atomically (external data past 2 GB), then shape-infer (strict) and check the written
    file. The proto is consumed: pass it in a one-item list to let it be freed right after saving,
    since shape inference and the checker then work from the file in C++."""
    if isinstance(model, list):
        model = model.pop()
    with staged_onnx(model, dest, strict=True, check=check):
        pass
    return dest


def has_external(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def float_values(t: gs.Constant, base_dir: Path | None = None) -> np.ndarray:
    """A constant's values as float32 without caching them in the graph (a 3 GB model's FP32 weights
    are read one at a time, quantized and dropped); external data is read from base_dir."""
    lazy = t._values if isinstance(t._values, LazyValues) else None
    if lazy is None:
        return np.asarray(t.values, dtype=np.float32)
    proto = lazy.tensor
    if proto.data_location == onnx.TensorProto.EXTERNAL:
        from onnx.external_data_helper import load_external_data_for_tensor

        tmp = onnx.TensorProto()
        tmp.CopyFrom(proto)
        load_external_data_for_tensor(tmp, str(base_dir or "."))
        tmp.data_location = onnx.TensorProto.DEFAULT
        del tmp.external_data[:]
        return np.asarray(onnx.numpy_helper.to_array(tmp), dtype=np.float32)
    return np.asarray(onnx.numpy_helper.to_array(proto), dtype=np.float32)


def materialize_external(graph: gs.Graph, base_dir: Path) -> None:
    """Read the external data of the constants still in the graph (the unquantized ones) into the
    graph, so it no longer points at the source's .data file."""
    from onnx.external_data_helper import load_external_data_for_tensor

    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues):
            proto = t._values.tensor
            if proto.data_location == onnx.TensorProto.EXTERNAL:
                load_external_data_for_tensor(proto, str(base_dir))
                proto.data_location = onnx.TensorProto.DEFAULT
                del proto.external_data[:]
