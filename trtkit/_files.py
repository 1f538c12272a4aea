"""Atomic file output: nothing half-written is ever left at the destination."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trtkit.errors import TrtkitError

# A single ONNX protobuf must stay under 2 GiB; keep some room for the graph beside the weights.
ONNX_PROTO_LIMIT = (2**31 - 1) - (64 << 20)


def ensure_writable_dir(directory: Path) -> Path:
    """Create `directory` (and parents) and check we can write there, with a one-line error if not."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrtkitError(f"cannot create output folder {directory}: {e.strerror or e}") from e
    if not os.access(directory, os.W_OK | os.X_OK):
        raise TrtkitError(f"output folder {directory} is not writable")
    return directory


@contextlib.contextmanager
def atomic_path(dest: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `dest`; rename it onto `dest` only if the block succeeds."""
    dest = Path(dest)
    ensure_writable_dir(dest.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or ".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary folder next to `dest`; it replaces `dest` only if the block succeeds."""
    dest = Path(dest)
    ensure_writable_dir(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_onnx(model: Any, dest: Path | str, *, external: bool | None = None, strict: bool = False,
                check: bool = False) -> Iterator[Path]:
    """Write an ONNX ModelProto beside `dest` in a temporary folder, shape-infer (and check) the written
    file, and yield its path for any further checks; on success move it onto `dest`.

    Weights go to one external data file `<dest name>.data` when `external` is True, or by default
    when the proto passes 2 GB. The data file moves first, then the model, so a model file never points
    at missing data; a stale `.data` of an earlier large output is removed. The proto is cleared once
    written: shape inference and the checker work from the file, and keeping a large model in memory
    beside them would double the peak.
    """
    import onnx

    dest = Path(dest)
    ensure_writable_dir(dest.parent)
    if external is None:
        external = model.ByteSize() > ONNX_PROTO_LIMIT
    data_name = dest.name + ".data"
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent) as tmpd:
        staged = Path(tmpd) / dest.name
        if external:
            onnx.save(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=data_name, size_threshold=1024)
        else:
            onnx.save(model, str(staged))
        model.Clear()
        try:
            onnx.shape_inference.infer_shapes_path(str(staged), str(staged), strict_mode=strict)
        except Exception as e:  # InferenceError: a broken graph must not be written
            raise TrtkitError(f"the graph for {dest.name} fails ONNX shape inference: "
                              f"{str(e).splitlines()[0]}") from e
        if check:
            try:
                onnx.checker.check_model(str(staged))
            except onnx.checker.ValidationError as e:
                raise TrtkitError(f"the graph for {dest.name} fails the ONNX checker: "
                                  f"{str(e).splitlines()[0]}") from e
        yield staged
        if external:
            os.replace(Path(tmpd) / data_name, dest.parent / data_name)
        elif (dest.parent / data_name).exists():
            (dest.parent / data_name).unlink()
        os.replace(staged, dest)


def load_onnx(path: Path | str, external: bool = False, needs_data: bool = False) -> Any:
    """onnx.load with the one-line errors every verb gives: a missing file, a file that is not ONNX, an
    empty graph (a 0-byte file parses as one), external data missing beside it (always when `external`,
    else where `needs_data`: the caller reads weights later). `external=False` reads the structure only."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise TrtkitError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=external)
    except Exception as e:  # protobuf DecodeError, missing external data
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrtkitError(f"{path} is not a readable ONNX model: {first}") from e
    if not model.graph.node or not model.graph.output:
        raise TrtkitError(f"{path} is not a readable ONNX model: it has no graph nodes or outputs")
    if needs_data:
        from onnx.external_data_helper import _get_all_tensors

        for t in _get_all_tensors(model):
            for entry in t.external_data:
                if entry.key == "location" and not (path.parent / entry.value).is_file():
                    raise TrtkitError(f"{path} keeps weights in {entry.value}, which is missing next to it")
    return model


def write_bytes_atomic(dest: Path | str, data: bytes) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def write_text_atomic(dest: Path | str, text: str) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
    return Path(dest)


def sha256_files(paths: list[Path], chunk: int = 1 << 20) -> str:
    """One hash over several files in order (an ONNX model and its external data)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()
