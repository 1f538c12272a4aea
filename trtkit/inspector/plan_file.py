"""A plan file's own bytes and its companion files, before any TensorRT: the magic and header
(`read_plan_header`), the `x.json` metadata `trtkit build` writes beside `x.plan`, which backend and
ONNX it names, and the checks that turn bad input into one-line errors (not a plan, truncated, from
another TensorRT version, metadata of another plan). `engine_report.py` loads the engine from these.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtkit.errors import TrtkitError

# First four bytes of a serialized engine. "ftrt": full TensorRT plans (what torch-tensorrt and others test
# for); "vtrt": TensorRT-RTX 1.x plans (seen on plans built here with tensorrt_rtx 1.7.1). Header layout
# checked on RTX plans only: uint64 total size at byte 16, version major/minor/patch/build at bytes 24..27.
PLAN_MAGICS = {b"ftrt": "trt", b"ptrt": "trt", b"vtrt": "rtx"}
RTX_HEADER = 64


@dataclass(frozen=True)
class PlanHeader:
    flavour: str  # "trt" | "rtx"
    size_field: int | None  # total plan size written in the header (RTX), else None
    version: tuple[int, int, int, int] | None  # builder version written in the header (RTX), else None

    @property
    def version_str(self) -> str | None:
        return ".".join(str(v) for v in self.version) if self.version else None


def companion_paths(plan: Path) -> tuple[Path, Path]:
    """x.plan -> (x.json metadata, x.layers.json layer information)."""
    return plan.with_suffix(".json"), plan.with_suffix(".layers.json")


def read_plan_header(plan: Path) -> PlanHeader:
    """Check the file is a TensorRT plan and whole; one-line TrtkitError otherwise."""
    if not plan.is_file():
        raise TrtkitError(f"engine file {plan} does not exist")
    size = plan.stat().st_size
    with open(plan, "rb") as f:
        head = f.read(RTX_HEADER)
    if size == 0:
        raise TrtkitError(f"{plan} is empty, not a TensorRT plan")
    flavour = PLAN_MAGICS.get(head[:4])
    if flavour is None:
        what = _sniff(head)
        raise TrtkitError(f"{plan} is not a TensorRT plan ({what}); pass an engine written by `trtkit build`"
                          " or an .onnx model")
    if size < 32:
        raise TrtkitError(f"{plan} is truncated: {size} bytes, shorter than a plan header")
    size_field = version = None
    if flavour == "rtx" and len(head) >= 28:
        size_field = struct.unpack_from("<Q", head, 16)[0]
        version = tuple(head[24:28])
        if size_field and size < size_field:
            raise TrtkitError(f"{plan} is truncated: {size} bytes of the {size_field} its header announces")
    return PlanHeader(flavour, size_field, version)  # type: ignore[arg-type]


def _sniff(head: bytes) -> str:
    if head.lstrip()[:1] in (b"{", b"["):
        return "it is JSON text"
    if len(head) > 1 and head[0] == 0x08 and 3 <= head[1] <= 15:  # protobuf field 1 = ONNX ir_version
        return "it looks like an ONNX model; run `trtkit inspect` on the .onnx path"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head[:32]):
        return "it is a text file"
    return f"unknown header {head[:4]!r}"


def read_metadata(plan: Path) -> dict[str, Any] | None:
    meta_path, _ = companion_paths(plan)
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrtkitError(f"{meta_path}: engine metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise TrtkitError(f"{meta_path}: engine metadata is not a JSON object")
    return meta


def _get(meta: dict[str, Any] | None, *paths: str) -> Any:
    """First present value among dotted key paths (the metadata file's keys are the builder room's)."""
    if not meta:
        return None
    for p in paths:
        cur: Any = meta
        for k in p.split("."):
            if not isinstance(cur, dict) or k not in cur:
                cur = None
                break
            cur = cur[k]
        if cur not in (None, ""):
            return cur
    return None


def meta_backend(meta: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(backend "trt"/"rtx", TensorRT version) that built the plan, per its metadata."""
    name = _get(meta, "backend.name", "backend", "versions.backend")
    if isinstance(name, dict):
        name = name.get("name")
    version = _get(meta, "backend.version", "versions.tensorrt", "versions.tensorrt_rtx", "tensorrt_version",
                   "trt_version", "versions.backend_version", "backend_version")
    if isinstance(name, str):
        name = {"tensorrt": "trt", "tensorrt_rtx": "rtx"}.get(name, name)
    return (name if isinstance(name, str) else None), (str(version) if version is not None else None)


def meta_onnx(meta: dict[str, Any] | None, plan: Path) -> Path | None:
    """The ONNX to cross-check against: the Q/DQ ONNX the build kept beside the plan, else its source."""
    kept = _get(meta, "qdq_onnx.path")
    if isinstance(kept, str) and (plan.parent / kept).is_file():
        return plan.parent / kept
    p = _get(meta, "onnx.path", "onnx", "onnx_path")
    if isinstance(p, dict):
        p = p.get("path")
    if not isinstance(p, str):
        return None
    path = Path(p)
    if not path.is_absolute():
        path = (plan.parent / path)
    return path if path.is_file() else None


def check_onnx_for(onnx: Path, meta: dict[str, Any] | None, plan: Path) -> str | None:
    """`--onnx` against what the metadata knows: another model (other inputs) is refused; the same
    interface with other bytes (a separate export or quantization) gets a note. None when it matches."""
    from trtkit.builder.source import read_onnx

    sums = {v for v in (_get(meta, "onnx.sha256"), _get(meta, "qdq_onnx.sha256")) if isinstance(v, str)}
    if not sums:
        return None  # no metadata: nothing to check against
    src = read_onnx(onnx)
    inputs = _get(meta, "io.inputs")
    names = [str(t.get("name")) for t in inputs if isinstance(t, dict)] if isinstance(inputs, list) else []
    if names and sorted(names) != sorted(src.inputs):
        raise TrtkitError(f"--onnx {onnx.name} is not the model {plan.name} was built from: its inputs are "
                          f"{', '.join(src.inputs) or 'none'}, the engine's {', '.join(names)}; omit --onnx to "
                          "use the ONNX recorded in the metadata")
    if src.sha256() in sums:
        return None
    return (f"--onnx {onnx.name} is not the file {plan.name} was built from (its sha256 differs from the "
            "metadata's): the cross-check assumes it has the same graph and Q/DQ placement")


def _same_release(a: str, b: str, rtx: bool) -> bool:
    """Plans load only on the TensorRT that built them (major.minor.patch for TensorRT, major.minor for RTX)."""
    pa, pb = a.split("."), b.split(".")
    n = 2 if rtx else 3
    return pa[:n] == pb[:n]


def check_version(plan: Path, header: PlanHeader, meta: dict[str, Any] | None, backend: Any | None) -> None:
    """Raise when the plan was built by another TensorRT than the installed one of the same flavour."""
    built_by, built_version = meta_backend(meta)
    if header.version_str and header.flavour == "rtx":
        built_by, built_version = "rtx", header.version_str
    if backend is None or built_version is None:
        return
    flavour = built_by or header.flavour
    if flavour != backend.name:
        return  # a TensorRT plan and an RTX runtime (or the reverse): reported as "cannot deserialize" below
    compat = bool(_get(meta, "build.version_compatible", "version_compatible", "settings.version_compatible"))
    if compat and backend.major >= int(built_version.split(".")[0]):
        return
    if not _same_release(built_version, backend.version, backend.is_rtx):
        label = "TensorRT-RTX" if backend.is_rtx else "TensorRT"
        raise TrtkitError(f"{plan} was built with {label} {built_version} but {label} {backend.version} is "
                          "installed; rebuild it with `trtkit build` or inspect it where that version is installed")


def check_metadata_matches(plan: Path, meta: dict[str, Any] | None) -> None:
    size = _get(meta, "plan.bytes", "plan.size", "plan_size", "plan_bytes")
    actual = plan.stat().st_size
    if isinstance(size, int) and size != actual:
        what = "truncated" if actual < size else "not the plan its metadata describes"
        raise TrtkitError(f"{plan} is {what}: {actual} bytes, its metadata records {size}")
