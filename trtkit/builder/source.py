"""What the builder needs to know about an ONNX file before TensorRT sees it, read with `onnx` alone:
inputs and their dims, trtkit export metadata, Q/DQ already present, external data files, hash."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtkit._files import load_onnx, sha256_files
from trtkit.errors import TrtkitError

log = logging.getLogger(__name__)

Dim = int | str | None  # int: static; str: a named dynamic axis; None: unknown
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear",
           "TRT_INT4QuantizeLinear", "TRT_INT4DequantizeLinear"}
_COMPONENT_BY_INPUT = {"sample": "unet", "input_ids": "text_encoder", "latent": "vae_decoder"}


@dataclass(frozen=True)
class OnnxSource:
    path: Path
    inputs: dict[str, tuple[Dim, ...]]
    outputs: tuple[str, ...]
    metadata: dict[str, str]
    qdq_types: tuple[str, ...]  # "int8" / "fp8" / "int4" found in Q/DQ nodes already there
    data_files: tuple[Path, ...] = field(default=())  # external data, in first-use order
    num_nodes: int = 0
    opset: int = 0

    @property
    def has_qdq(self) -> bool:
        return bool(self.qdq_types)

    @property
    def component(self) -> str:
        comp = self.metadata.get("trtkit.component")
        if comp:
            return comp
        for name, c in _COMPONENT_BY_INPUT.items():
            if name in self.inputs:
                return c
        return "unet"

    @property
    def model_dir(self) -> Path | None:
        """The diffusers folder the ONNX was exported from, if trtkit exported it and it is still there."""
        src = self.metadata.get("trtkit.source")
        if src and Path(src).is_dir():
            return Path(src)
        return None

    def sha256(self) -> str:
        return sha256_files([self.path, *self.data_files])


def _dims(value_info: Any) -> tuple[Dim, ...]:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return ()
    out: list[Dim] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return tuple(out)


def _qdq_types(model: Any) -> tuple[str, ...]:
    """Quantized types of the Q nodes: from the zero point's dtype, `output_dtype`, or the op domain."""
    from onnx import TensorProto

    by_dtype: dict[int, str] = {TensorProto.INT8: "int8", TensorProto.UINT8: "int8", TensorProto.FLOAT8E4M3FN: "fp8",
                TensorProto.INT4: "int4", TensorProto.UINT4: "int4"}
    init_types = {i.name: i.data_type for i in model.graph.initializer}
    const_types: dict[str, int] = {}
    found: set[str] = set()
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    const_types[n.output[0]] = a.t.data_type
    for n in model.graph.node:
        if n.op_type not in QDQ_OPS:
            continue
        if n.op_type.startswith("TRT_FP8"):
            found.add("fp8")
            continue
        if n.op_type.startswith("TRT_INT4"):
            found.add("int4")
            continue
        attr = {a.name: a for a in n.attribute}
        zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
        dtype: int
        if zp is not None and (zp in init_types or zp in const_types):
            dtype = init_types[zp] if zp in init_types else const_types[zp]
        elif n.op_type == "QuantizeLinear" and "output_dtype" in attr and attr["output_dtype"].i:
            dtype = attr["output_dtype"].i
        elif n.op_type == "QuantizeLinear":
            dtype = TensorProto.UINT8  # ONNX's default, which TensorRT imports as int8
        elif n.input[0] in init_types:  # a DQ of a stored quantized weight
            dtype = init_types[n.input[0]]
        else:
            continue  # a DQ fed by a Q: that Q says the type
        found.add(by_dtype.get(dtype, "int8"))
    return tuple(sorted(found))


def read_onnx(path: Path | str) -> OnnxSource:
    """Read an ONNX file's structure without its weights; a one-line TrtkitError if it is not ONNX."""
    from onnx.external_data_helper import _get_all_tensors

    path = Path(path)
    model = load_onnx(path)
    g = model.graph
    if not g.node or not g.output:
        raise TrtkitError(f"{path} is not a readable ONNX model: it has no graph nodes or outputs")
    init_names = {i.name for i in g.initializer}
    inputs = {i.name: _dims(i) for i in g.input if i.name not in init_names}
    files: list[Path] = []
    for t in _get_all_tensors(model):
        for entry in t.external_data:
            if entry.key == "location":
                f = path.parent / entry.value
                if f not in files:
                    if not f.is_file():
                        raise TrtkitError(f"{path} keeps weights in {entry.value}, which is missing next to it")
                    files.append(f)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return OnnxSource(path=path, inputs=inputs, outputs=tuple(o.name for o in g.output),
                      metadata={p.key: p.value for p in model.metadata_props}, qdq_types=_qdq_types(model),
                      data_files=tuple(files), num_nodes=len(g.node), opset=opset)
