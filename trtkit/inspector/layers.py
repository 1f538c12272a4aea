"""Engine layer information (the engine inspector's JSON) -> typed layers, for TensorRT 10 and 11.

Formats accepted (see shared docs, tensorrt-api.md section 3):
- TensorRT 10, DETAILED: {"Layers": [{Name, LayerType, Inputs/Outputs: [{Name, Location, Dimensions,
  "Format/Datatype": "Row major linear FP16 format"}], ParameterType, TacticName, TacticValue, Metadata, ...}],
  "Bindings": ["sample", ...]}
- TensorRT 11, DETAILED: the same layer objects with the combined string split into `Format` and `DataType`
  (the exact key names are unverified, so both spellings are read), and "I/O Tensors" objects instead of Bindings.
- LAYER_NAMES_ONLY (either version): "Layers" is a list of plain strings.
Unknown fields are kept in `Layer.extra`; nothing unknown is fatal.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from trtkit.errors import TrtkitError
from trtkit.inspector.rows import JsonRow

ONNX_LAYER_RE = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
# Myelin regions are named "{ForeignNode[first_node...last_node]}" when only names are kept.
FOREIGN_RE = re.compile(r"\{ForeignNode\[(.*)\]\}")

EIGHT_BIT = ("INT8", "FP8")
LOW_BIT = ("INT8", "FP8", "INT4", "FP4")
FLOAT = ("FP32", "FP16", "BF16")

# Spellings seen in "Format/Datatype" strings and DataType fields -> one canonical name.
_DTYPE_WORDS = {
    "fp32": "FP32", "float": "FP32", "float32": "FP32", "kfloat": "FP32",
    "fp16": "FP16", "half": "FP16", "float16": "FP16", "khalf": "FP16",
    "bf16": "BF16", "bfloat16": "BF16", "kbf16": "BF16",
    "int8": "INT8", "kint8": "INT8",
    "fp8": "FP8", "float8": "FP8", "e4m3": "FP8", "fp8e4m3": "FP8", "kfp8": "FP8",
    "int4": "INT4", "kint4": "INT4", "fp4": "FP4", "kfp4": "FP4", "e2m1": "FP4",
    "int32": "INT32", "kint32": "INT32", "int64": "INT64", "kint64": "INT64",
    "bool": "BOOL", "kbool": "BOOL", "uint8": "UINT8", "kuint8": "UINT8", "e8m0": "E8M0",
}
_DTYPE_TOKEN = re.compile(r"\b(" + "|".join(sorted(_DTYPE_WORDS, key=len, reverse=True)) + r")\b", re.I)

# Tactic-name fragments that name the kernel's math precision (cuBLASLt/CASK naming: imma = int8 MMA).
_TACTIC_8BIT = (("fp8", "FP8"), ("e4m3", "FP8"), ("int8", "INT8"), ("i8i8", "INT8"), ("imma", "INT8"))
ATTENTION_HINTS = ("mha", "fmha", "attention", "flash")

_KNOWN_LAYER_KEYS = {"Name", "LayerType", "Inputs", "Outputs", "ParameterType", "TacticName", "TacticValue",
                     "Origin", "Metadata"}
_KNOWN_TENSOR_KEYS = {"Name", "Location", "Dimensions", "Format/Datatype", "Format", "DataType", "Datatype"}


def canonical_dtype(text: str | None) -> str | None:
    """'Row major linear FP16 format' / 'Half' / 'kINT8' -> 'FP16' / 'FP16' / 'INT8'; None if no type named."""
    if not text:
        return None
    m = _DTYPE_TOKEN.search(str(text))
    return _DTYPE_WORDS[m.group(1).lower()] if m else None


@dataclass(frozen=True)
class TensorInfo(JsonRow):
    name: str
    dtype: str | None  # canonical: FP32, FP16, BF16, INT8, FP8, INT32, ...
    format: str  # layout words, dtype removed: "Row major linear", "Channel major ... % 8 == 0"
    dims: tuple[int, ...] | None
    location: str | None = None

    @classmethod
    def parse(cls, obj: Any) -> TensorInfo:
        if isinstance(obj, str):
            return cls(obj, None, "", None)
        if not isinstance(obj, dict):
            return cls(str(obj), None, "", None)
        if "Format/Datatype" in obj:  # TensorRT 10: one combined string
            combined = str(obj["Format/Datatype"])
            dtype = canonical_dtype(combined)
            fmt = _DTYPE_TOKEN.sub("", combined)
        else:  # TensorRT 11: separate fields (key spelling unverified: accept both)
            raw_type = obj.get("DataType", obj.get("Datatype"))
            fmt = str(obj.get("Format", ""))
            dtype = canonical_dtype(raw_type) or canonical_dtype(fmt)
            fmt = _DTYPE_TOKEN.sub("", fmt)
        fmt = " ".join(fmt.replace("format", "").split())
        dims = obj.get("Dimensions")
        dims_t = tuple(int(d) for d in dims) if isinstance(dims, list) and all(
            isinstance(d, (int, float)) for d in dims) else None
        return cls(str(obj.get("Name", "")), dtype, fmt, dims_t, obj.get("Location"))


@dataclass(frozen=True)
class Layer:
    index: int
    name: str
    type: str  # LayerType (or "" when only names were saved)
    inputs: tuple[TensorInfo, ...] = ()
    outputs: tuple[TensorInfo, ...] = ()
    tactic: str = ""
    onnx_nodes: tuple[str, ...] = ()
    nodes_from: str = "metadata"  # "metadata" | "name" (guessed from the layer name)
    parameter_type: str = ""
    origin: str = ""
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def detailed(self) -> bool:
        return bool(self.type or self.inputs or self.outputs)

    @property
    def kind(self) -> str:
        """conv, matmul, attention, myelin, qdq, reformat or other: what the report groups by."""
        t = f"{self.type} {self.parameter_type}".lower()
        n = self.name.lower()
        if self.origin.upper() == "QDQ":  # a Q or DQ TensorRT could not fuse, run as its own (reformat) layer
            return "qdq"
        if "reformat" in t or "reformatting copynode" in n or "reformatter" in n:
            return "reformat"
        if "quantize" in t or (self.onnx_nodes and all(_is_qdq_name(x) for x in self.onnx_nodes)):
            return "qdq"
        if any(h in t or h in self.tactic.lower() for h in ATTENTION_HINTS):
            return "attention"
        if "myelin" in t or FOREIGN_RE.search(self.name):
            return "myelin"
        if "convolution" in t or "deconvolution" in t:
            return "conv"
        if "matrixmultiply" in t or "gemm" in t or "fullyconnected" in t:
            return "matmul"
        if not t.strip() and self.onnx_nodes:  # names only: go by the ONNX op in the last node's name
            op = self.onnx_nodes[-1].rsplit("/", 1)[-1].split("_")[0]
            return {"Conv": "conv", "ConvTranspose": "conv", "MatMul": "matmul", "Gemm": "matmul"}.get(op, "other")
        return "other"

    @property
    def reformat_for(self) -> str | None:
        """For "Reformatting CopyNode for Input Tensor 0 to X": X, the layer whose input is reformatted."""
        m = re.match(r"Reformatting CopyNode for (?:Input|Output) Tensor \d+ to (.+)$", self.name)
        return m.group(1) if m else None

    @property
    def weights_dtype(self) -> str | None:
        w = self.extra.get("Weights")
        return canonical_dtype(w.get("Type")) if isinstance(w, dict) else None

    @property
    def is_myelin(self) -> bool:
        """A Myelin region: one "layer" standing for a whole fused subgraph ({ForeignNode[a...b]})."""
        return "myelin" in self.type.lower() or bool(self.detailed and FOREIGN_RE.search(self.name))

    @property
    def precision(self) -> str:
        """The precision the layer computes in, as far as the layer information tells.

        8-bit when a data input is 8-bit or the tactic names an 8-bit kernel; else the first floating
        input type; else the first output type; "?" when the engine kept names only. Myelin regions:
        see region_precision (their boundary tensors do not tell the inside).
        """
        in_types = [t.dtype for t in self.inputs if t.dtype]
        for dt in in_types:
            if dt in LOW_BIT:
                return dt
        tactic = self.tactic.lower()
        for frag, dt in _TACTIC_8BIT:
            if frag in tactic:
                return dt
        if self.is_myelin:
            return region_precision(self)
        for dt in in_types:
            if dt in FLOAT:
                return dt
        out_types = [t.dtype for t in self.outputs if t.dtype]
        if out_types:
            return out_types[0]
        return in_types[0] if in_types else "?"

    def flops(self) -> float | None:
        """Multiply-adds x2 from the layer's own dimensions (conv and matmul only); None if unknown."""
        out = self.outputs[0].dims if self.outputs else None
        inp = self.inputs[0].dims if self.inputs else None
        if not out or any(d <= 0 for d in out) or not inp or any(d <= 0 for d in inp):
            return None
        n_out = 1
        for d in out:
            n_out *= d
        if self.kind == "conv":
            kernel = self.extra.get("Kernel")
            groups = int(self.extra.get("Groups", 1) or 1)
            if not isinstance(kernel, list) or len(inp) < 2:
                return None
            k = 1
            for d in kernel:
                k *= int(d)
            return 2.0 * n_out * (inp[1] / groups) * k
        if self.kind == "matmul":
            op_a = str(self.extra.get("MatrixOpA", "")).upper()
            k_dim = inp[-2] if "TRANSPOSE" in op_a and len(inp) >= 2 else inp[-1]
            return 2.0 * n_out * k_dim
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index, "name": self.name, "type": self.type, "kind": self.kind,
            "precision": self.precision, "tactic": self.tactic,
            "inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs],
            "onnx_nodes": list(self.onnx_nodes), "nodes_from": self.nodes_from,
            "parameter_type": self.parameter_type, "origin": self.origin, "flops": self.flops(),
            "reformat_for": self.reformat_for,
            "extra": self.extra,
        }


def inner_layers(layer: Layer) -> tuple[Layer, ...]:
    """Layers a Myelin region lists inside itself, where the layer information has them: any list of
    layer-like objects (with LayerType/Inputs/Outputs) among its unknown keys. TensorRT 10's documented
    DETAILED JSON has none (tensorrt-api.md section 3.2), so this is () there; the key name is not assumed."""
    out: list[Layer] = []
    for value in layer.extra.values():
        if isinstance(value, list) and value and all(
                isinstance(o, dict) and ("LayerType" in o or "Inputs" in o or "Outputs" in o) for o in value):
            out.extend(parse_layer(i, o) for i, o in enumerate(value))
    return tuple(out)


def region_precision(layer: Layer) -> str:
    """Precision of a Myelin region (after the 8-bit checks of Layer.precision).

    With inner layers: their compute precisions (reformat/Q/DQ copies aside), one type or "mixed".
    Without: the floating types of every boundary tensor, inputs AND outputs, one type or "mixed" (an FP32
    input and FP16 outputs mean a cast inside: "mixed", where the first input alone would say FP32).
    A region with FP32 I/O and FP16 compute inside but no cast at its boundary still reads FP32: the layer
    information does not say more.
    """
    inner = [x.precision for x in inner_layers(layer) if x.kind not in ("reformat", "qdq")]
    types = [t for t in inner if t != "?"]
    if not types:
        types = [t.dtype for t in (*layer.inputs, *layer.outputs) if t.dtype in (*FLOAT, *LOW_BIT)]
    low = [t for t in types if t in LOW_BIT]
    if low:
        return low[0]
    kinds = list(dict.fromkeys(types))
    if not kinds:  # no floating tensor at all (an integer shape computation): its first type
        other = [t.dtype for t in (*layer.outputs, *layer.inputs) if t.dtype]
        return other[0] if other else "?"
    return kinds[0] if len(kinds) == 1 else "mixed"


@dataclass(frozen=True)
class IOTensor(JsonRow):
    name: str
    mode: str | None = None  # "Input" / "Output" (TensorRT 11 only)
    dtype: str | None = None
    dims: tuple[int, ...] | None = None
    profiles: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class EngineLayers:
    """The parsed engine information: layers, I/O, which schema it followed, and what else it had."""

    layers: tuple[Layer, ...]
    io: tuple[IOTensor, ...]
    schema: str  # "trt10" | "trt11" | "unknown"
    verbosity: str  # "detailed" | "layer_names_only" | "none"
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "verbosity": self.verbosity, "io": [t.to_json() for t in self.io],
                "layers": [x.to_json() for x in self.layers], "extra": self.extra}


def _is_qdq_name(node: str) -> bool:
    base = node.rsplit("/", 1)[-1]
    return base.startswith(("QuantizeLinear", "DequantizeLinear")) or base.endswith(("_quantizer", "_dequantizer"))


def nodes_from_name(name: str) -> tuple[str, ...]:
    """Best guess of the ONNX nodes in a layer named by TensorRT: "a + b", "{ForeignNode[a...b]}"."""
    m = FOREIGN_RE.search(name)
    if m:
        parts = m.group(1).split("...")
    else:
        parts = name.split(" + ")
    out = []
    for p in parts:
        p = p.strip()
        # Reformat layers are named after the tensor they copy: "Reformatting CopyNode for Input Tensor 0 to x".
        if p and not p.lower().startswith(("reformatting copynode", "[trainstation]")):
            out.append(p)
    return tuple(out)


def _metadata_nodes(meta: Any) -> tuple[str, ...]:
    if not meta:
        return ()
    nodes = ONNX_LAYER_RE.findall(str(meta))
    seen: dict[str, None] = {}
    for n in nodes:
        seen.setdefault(n.strip(), None)
    return tuple(seen)


def parse_layer(index: int, obj: Any) -> Layer:
    if isinstance(obj, str):  # LAYER_NAMES_ONLY
        return Layer(index, obj, "", onnx_nodes=nodes_from_name(obj), nodes_from="name")
    if not isinstance(obj, dict):
        return Layer(index, str(obj), "", extra={"raw": obj})
    name = str(obj.get("Name", f"layer_{index}"))
    nodes = _metadata_nodes(obj.get("Metadata"))
    nodes_from = "metadata"
    if not nodes:
        nodes, nodes_from = nodes_from_name(name), "name"
    tactic = obj.get("TacticName") or ""
    if not tactic and obj.get("TacticValue") not in (None, ""):
        tactic = str(obj.get("TacticValue"))
    extra = {k: v for k, v in obj.items() if k not in _KNOWN_LAYER_KEYS}
    for key in ("Inputs", "Outputs"):  # keep unknown per-tensor keys as well
        for i, t in enumerate(obj.get(key) or []):
            if isinstance(t, dict):
                unknown = {k: v for k, v in t.items() if k not in _KNOWN_TENSOR_KEYS}
                if unknown:
                    extra.setdefault(f"{key}.extra", {})[i] = unknown
    if obj.get("TacticValue") not in (None, ""):
        extra["TacticValue"] = obj.get("TacticValue")
    return Layer(
        index=index, name=name, type=str(obj.get("LayerType", "")),
        inputs=tuple(TensorInfo.parse(t) for t in obj.get("Inputs") or []),
        outputs=tuple(TensorInfo.parse(t) for t in obj.get("Outputs") or []),
        tactic=str(tactic), onnx_nodes=nodes, nodes_from=nodes_from,
        parameter_type=str(obj.get("ParameterType", "")), origin=str(obj.get("Origin", "")), extra=extra,
    )


def _parse_io(info: dict[str, Any]) -> tuple[tuple[IOTensor, ...], str]:
    if "I/O Tensors" in info:  # TensorRT 11
        io = []
        for t in info.get("I/O Tensors") or []:
            if isinstance(t, str):
                io.append(IOTensor(t))
                continue
            dims = t.get("Dimensions")
            io.append(IOTensor(
                name=str(t.get("Name", "")), mode=t.get("IOMode"),
                dtype=canonical_dtype(t.get("DataType") or t.get("Datatype")),
                dims=tuple(int(d) for d in dims) if isinstance(dims, list) else None,
                profiles=tuple(p for p in t.get("ProfileInfo") or [] if isinstance(p, dict)),
            ))
        return tuple(io), "trt11"
    if "Bindings" in info:  # TensorRT 10
        return tuple(IOTensor(str(b)) for b in info.get("Bindings") or []), "trt10"
    return (), "unknown"


def parse_engine_information(data: str | bytes | dict[str, Any]) -> EngineLayers:
    """Parse `get_engine_information(JSON)` output (or a saved copy of it)."""
    if isinstance(data, (str, bytes)):
        try:
            info = json.loads(data)
        except json.JSONDecodeError as e:
            raise TrtkitError(f"layer information is not valid JSON: {e}") from e
    else:
        info = data
    if isinstance(info, list):  # a bare list of layers (some tools save only that)
        info = {"Layers": info}
    if not isinstance(info, dict) or "Layers" not in info:
        raise TrtkitError("layer information has no 'Layers' list (expected the engine inspector's JSON)")
    raw_layers = info.get("Layers") or []
    if not isinstance(raw_layers, list):
        raise TrtkitError("layer information: 'Layers' is not a list")
    layers = tuple(parse_layer(i, obj) for i, obj in enumerate(raw_layers))
    io, schema = _parse_io(info)
    if schema == "unknown" and any(isinstance(o, dict) and any(
            isinstance(t, dict) and "DataType" in t for t in (o.get("Inputs") or [])) for o in raw_layers):
        schema = "trt11"
    elif schema == "unknown" and any(isinstance(o, dict) and any(
            isinstance(t, dict) and "Format/Datatype" in t for t in (o.get("Inputs") or [])) for o in raw_layers):
        schema = "trt10"
    if not layers:
        verbosity = "none"
    elif all(not x.detailed for x in layers):
        verbosity = "layer_names_only"
    else:
        verbosity = "detailed"
    extra = {k: v for k, v in info.items() if k not in ("Layers", "Bindings", "I/O Tensors")}
    return EngineLayers(layers=layers, io=io, schema=schema, verbosity=verbosity, extra=extra)
