"""What a build leaves beside the plan besides the plan and its metadata, and how two builds to one
path stay consistent: the Q/DQ ONNX the build's own pass made (`<stem>.qdq.onnx`), and a lock on the
output folder held from the plan's move until its metadata is written."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trtkit.builder.config import BuildConfig
from trtkit.builder.source import OnnxSource

log = logging.getLogger(__name__)


def qdq_onnx_path(config: BuildConfig) -> Path:
    return config.output.with_suffix(".qdq.onnx")


def keep_qdq_onnx(dest: Path, source: OnnxSource, graph: OnnxSource) -> dict[str, Any] | None:
    """Move the graph the Q/DQ pass made (what TensorRT parsed) beside the plan as `<stem>.qdq.onnx`, so
    `trtkit inspect` can cross-check the engine against it; its {path (beside the plan), sha256, files}."""
    stale_data = dest.with_name(dest.name + ".data")
    if source.has_qdq or graph.path == source.path or graph.path.name != dest.name:
        return None  # no Q/DQ pass ran: the source ONNX is the one to cross-check against
    if dest.resolve() == source.path.resolve():
        log.warning("not keeping the Q/DQ ONNX: %s is the input", dest)
        return None
    sha = graph.sha256()
    for f in graph.data_files:  # data first: the model never points at a missing file
        os.replace(f, dest.parent / f.name)
    if not graph.data_files:
        stale_data.unlink(missing_ok=True)
    os.replace(graph.path, dest)
    return {"path": dest.name, "sha256": sha, "files": [dest.name, *(f.name for f in graph.data_files)]}


def plan_identity(plan: Path) -> tuple[int, int, int] | None:
    try:
        st = plan.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@contextlib.contextmanager
def output_lock(directory: Path) -> Iterator[None]:
    """An exclusive flock on the output folder (no lock file to leave behind), for the moment a build moves
    its plan in and writes the metadata: concurrent builds to one path then leave a consistent pair."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
