"""ONNX files in and out for the graph passes (Q/DQ, FP16): writing with a check, metadata, opset, and
reading constants that may live in an external .data file, one at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from trtkit._files import load_onnx, staged_onnx

__all__ = ["Spill", "external_bytes", "float_values", "has_external", "load_onnx", "materialize_external", "opset", "set_meta", "write_model"]


def opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def set_meta(model: onnx.ModelProto, props: dict[str, str]) -> None:
    del model.metadata_props[:]
    for k, v in props.items():
        e = model.metadata_props.add()
        e.key, e.value = k, v


def write_model(model: onnx.ModelProto | list[onnx.ModelProto], dest: Path, check: bool = True,
                spill: Spill | None = None) -> Path:
    """Write atomically (external data past 2 GB), then shape-infer (strict) and check the written
    file. The proto is consumed: pass it in a one-item list to let it be freed right after saving,
    since shape inference and the checker then work from the file in C++. With a `spill`, the data
    file it wrote is the output's, and the proto's other tensors are appended to it."""
    if isinstance(model, list):
        model = model.pop()
    with staged_onnx(model, dest, strict=True, check=check, staging=spill.dir if spill is not None else None):
        pass
    return dest


class Spill:
    """Weights written to the output's data file as they are made, in its staging folder beside the
    output (trtkit._files.staging_dir), the graph keeping external stubs of them: the Q/DQ pass of a
    model with external data then holds no weights of its output in memory (a FLUX-size transformer's
    FP8 weights are 12 GB, and exporting the graph and serializing the proto copied them twice over)."""

    def __init__(self, dest: Path) -> None:
        from trtkit._files import ensure_writable_dir, staging_dir

        ensure_writable_dir(dest.parent)  # as the writer would (the output's folder may not exist yet)
        self._tmp = staging_dir(dest)
        self.dir = Path(self._tmp.name)
        self.name = dest.name + ".data"
        self._f = open(self.dir / self.name, "wb")  # noqa: SIM115 - closed by close()
        self.names: set[str] = set()  # the stubs' tensor names

    def put(self, t: onnx.TensorProto) -> onnx.TensorProto:
        """The stub of `t` (raw data) after appending its bytes, 64-byte aligned for mmap readers."""
        from trtkit.graph.external import _set_ext

        self._f.write(b"\0" * ((-self._f.tell()) % 64))
        offset = self._f.tell()
        self._f.write(t.raw_data)
        stub = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims))
        self.names.add(t.name)
        _set_ext(stub, self.name, offset, len(t.raw_data))
        return stub

    def close(self) -> None:
        """Flushed for the writer, which appends the rest."""
        if not self._f.closed:
            self._f.close()

    def cleanup(self) -> None:
        """Whatever is left of the staging folder (all of it when the pass failed)."""
        self.close()
        self._tmp.cleanup()


def has_external(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers held in external data files (from their recorded lengths)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += next((int(e.value) for e in t.external_data if e.key == "length"), 0)
    return total


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


def materialize_external(graph: gs.Graph, base_dir: Path, spill: Spill | None = None) -> None:
    """Read the external data of the constants still in the graph (the unquantized ones) into the
    graph, so it no longer points at the source's .data file; a `spill`'s stubs point at the output's."""
    from onnx.external_data_helper import load_external_data_for_tensor

    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues):
            proto = t._values.tensor
            if spill is not None and proto.name in spill.names:
                continue
            if proto.data_location == onnx.TensorProto.EXTERNAL:
                load_external_data_for_tensor(proto, str(base_dir))
                proto.data_location = onnx.TensorProto.DEFAULT
                del proto.external_data[:]
