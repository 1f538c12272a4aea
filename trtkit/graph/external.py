"""Weights streamed one at a time from the input's external data file to the output's.

The FP16 pass on a UNet with external data (every UNet past 2 GB) reads the graph structure only;
an FP32 weight that becomes FP16 is a stub (a TensorProto with the FP16 type and the shape, no data)
until the output is written, and then each weight is read from the input's data file, converted if it
must be, and appended to the output's data file, one at a time. Peak memory is the structure plus the
largest single weight, instead of the FP32 weights + their FP16 copies + the serialized output
(16 GiB for the SD 1.5 UNet, more than 24 GB for SDXL's). Written here because onnx's external-data
helpers load every tensor into the proto first; graphsurgeon exports a lazily held TensorProto as it is.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.external_data_helper import uses_external_data
from onnx_graphsurgeon.ir.tensor import LazyValues

from trtkit.errors import TrtkitError


def _set_ext(t: onnx.TensorProto, location: str, offset: int = 0, length: int = 0) -> None:
    """onnx's set_external_data insists on raw_data being present; a stub has none."""
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


def _ext(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


class Streamer:
    """Converts lazily: `fp16(c)` gives the FP16 stand-in of an external FP32 constant; `write` streams."""

    def __init__(self, src_dir: Path) -> None:
        self.src_dir = src_dir
        self.jobs: dict[str, onnx.TensorProto] = {}  # stub name -> the FP32 source tensor

    def fp16(self, c: gs.Constant) -> gs.Constant | None:
        v = c._values
        if not isinstance(v, LazyValues) or not uses_external_data(v.tensor):
            return None
        src = onnx.TensorProto()
        src.CopyFrom(v.tensor)
        stub = onnx.TensorProto(name=f"{c.name}_fp16", data_type=onnx.TensorProto.FLOAT16, dims=list(src.dims))
        _set_ext(stub, "pending")
        self.jobs[stub.name] = src
        return gs.Constant(stub.name, LazyValues(stub))

    def read(self, t: onnx.TensorProto) -> np.ndarray:
        e = _ext(t)
        path = self.src_dir / e["location"]
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        count = int(np.prod(t.dims)) if len(t.dims) else 1
        try:
            a = np.fromfile(path, dtype=dtype, count=count, offset=int(e.get("offset", 0)))
        except OSError as err:
            raise TrtkitError(f"external data {path} of {t.name!r} is unreadable: {err}") from err
        if a.size != count:
            raise TrtkitError(f"external data {path} is shorter than {t.name!r} needs")
        return a

    def write(self, model: onnx.ModelProto, dest: Path, strict: bool = True, check: bool = True) -> Path:
        """Stage the model and its data file beside `dest`, check them, then move them into place."""
        data_name = dest.name + ".data"
        with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent) as tmpd:
            staged = Path(tmpd) / dest.name
            with open(Path(tmpd) / data_name, "wb") as f:
                for init in model.graph.initializer:
                    if not uses_external_data(init):
                        continue
                    src = self.jobs.get(init.name, init)
                    a = self.read(src)
                    if src is not init:
                        a = a.astype(np.float16)  # numpy rounding, as the in-memory pass does
                    pad = (-f.tell()) % 64  # aligned for mmap readers
                    f.write(b"\0" * pad)
                    offset = f.tell()
                    f.write(a.tobytes())
                    _set_ext(init, data_name, offset, a.nbytes)
                    del a
            onnx.save(model, str(staged))
            try:
                onnx.shape_inference.infer_shapes_path(str(staged), str(staged), strict_mode=strict)
                if check:
                    onnx.checker.check_model(str(staged))
            except Exception as e:
                raise TrtkitError(f"the graph for {dest.name} fails ONNX checks: {str(e).splitlines()[0]}") from e
            os.replace(Path(tmpd) / data_name, dest.parent / data_name)
            os.replace(staged, dest)
        return dest
