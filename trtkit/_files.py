"""File output: the checks every verb runs on its output paths before any work, and atomic writes that
leave nothing half-written at the destination and give new files the mode open() would.

Output path rules (docs/outputs.md), the same for every verb:
- an existing folder given where a file is wanted: the file goes into it under the verb's default name;
- an existing path that is not a regular file or a folder (device node, FIFO, socket, or a symlink to
  one) is refused, never replaced: `-o /dev/null` stays /dev/null;
- a symlink to a regular file is followed, as open() and the shell's `>` follow it: the file it points
  at is replaced (atomically), the link stays;
- an output (or a file written beside it) that is one of the verb's inputs is refused, whatever the
  spelling (`./x`, a symlink, a hard link);
- a folder where nothing can be created (read-only, /proc, no permission) is refused, found by creating
  and removing a probe file, since os.access() says yes to root and knows nothing of read-only mounts.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from trtkit.errors import TrtkitError

# A single ONNX protobuf must stay under 2 GiB; keep some room for the graph beside the weights.
ONNX_PROTO_LIMIT = (2**31 - 1) - (64 << 20)

_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"))


# --------------------------------------------------------------------------- modes

def current_umask() -> int:
    """The process umask. Read from /proc where it is there: os.umask() can only read it by setting it,
    which races with other threads creating files."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def settle_mode(path: Path, like: Path | None = None) -> None:
    """Give a staged file or folder the mode open()/mkdir() would have given it: the existing `like`'s
    (open() keeps the mode of a file it overwrites), else 0666/0777 less the umask. mkstemp/mkdtemp make
    0600/0700, and os.replace keeps that."""
    st = path.stat()
    if like is not None:
        with contextlib.suppress(OSError):
            os.chmod(path, like.stat().st_mode & 0o7777)
            return
    full = 0o777 if stat.S_ISDIR(st.st_mode) else 0o666 | (st.st_mode & 0o111)
    os.chmod(path, full & ~current_umask())


def _settle_tree(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            p = Path(dirpath) / name
            if not p.is_symlink():
                settle_mode(p)
    settle_mode(root)


# --------------------------------------------------------------------------- output path checks

def _kind(mode: int) -> str | None:
    """What a non-regular, non-folder file is; None for a regular file or a folder."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _same(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)  # hard links and symlinks too
    return os.path.realpath(a) == os.path.realpath(b)


def _nearest_existing(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _probe(directory: Path) -> str | None:
    """Create and remove a file in `directory` (or, where it does not exist yet, a folder in its nearest
    existing ancestor): the only check that root, read-only mounts, ACLs and /proc all answer truly.
    Returns why nothing can be written there, or None."""
    base = _nearest_existing(directory)
    if not base.is_dir():
        return f"{base} is not a folder"
    try:
        if base == Path(os.path.abspath(directory)):
            fd, probe = tempfile.mkstemp(prefix=".trtkit-probe-", dir=base)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".trtkit-probe-", dir=base))
    except OSError as e:
        writable = e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS)
        return f"{base} {'does not accept new files' if writable else 'is not writable'} ({e.strerror})"
    return None


def check_output(path: Path | str, *, default_name: str | None = None, inputs: Iterable[Path | str | None] = (),
                 sidecars: Callable[[Path], Iterable[Path]] | None = None, what: str = "output") -> Path:
    """Check an output file before any work, with a one-line TrtkitError for each way it can go wrong
    (module docstring); return the file to write: `path`, or `path/default_name` where `path` is a
    folder. `sidecars(out)` names the files written beside it (a plan's .json); they get the same checks.
    Nothing is created."""
    raw = str(path)
    out = Path(path)
    if os.path.isdir(out) or (raw.endswith(os.sep) and not out.exists()):
        if default_name is None:
            raise TrtkitError(f"{what} {out} is a folder; give a file name")
        out = out / default_name
    ins = [Path(p) for p in inputs if p is not None]
    for p in (out, *(sidecars(out) if sidecars else ())):
        _check_one(p, f"{what} {p}" if p is out else f"{p} (written beside {out.name})", ins)
    parent = Path(os.path.realpath(out)).parent
    why = _probe(parent)
    if why:
        raise TrtkitError(f"cannot write {what} {out}: {why}" if parent.is_dir() else
                          f"cannot create output folder {out.parent}: {why}")
    return out


def unused_name(folder: Path | str, name: str) -> Path:
    """`folder/name`, or the first of `stem-1.ext`, `stem-2.ext`, ... that does not exist yet: for outputs whose
    name the user did not give (`trtkit run` without -o), so a second run never replaces the first's file."""
    first = Path(folder) / name
    out, n = first, 0
    while os.path.lexists(out):
        n += 1
        out = first.with_name(f"{first.stem}-{n}{first.suffix}")
    return out


def _check_one(p: Path, label: str, inputs: list[Path]) -> None:
    """`label` names `p` in the messages ("plan x.plan", "x.json (written beside x.plan)")."""
    try:
        mode = os.stat(p).st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None  # new (or a dangling symlink: followed, as open() would); the folder is probed later
    except OSError as e:
        raise TrtkitError(f"cannot use {label}: {e.strerror}") from e
    if mode is not None:
        if stat.S_ISDIR(mode):
            raise TrtkitError(f"{label} is a folder; give a file name")
        kind = _kind(mode)
        if kind is not None:
            link = f" (a symlink to {os.path.realpath(p)})" if p.is_symlink() else ""
            raise TrtkitError(f"{label}{link} is {kind}, not a regular file; refusing to replace it")
    for src in inputs:
        if _same(p, src):
            raise TrtkitError(f"{label} must not overwrite the input {src}; choose another name")


def check_output_dir(path: Path | str, what: str = "output folder") -> Path:
    """Check a folder the verb will create or write into, before any work; nothing is created."""
    out = Path(path)
    if os.path.lexists(out) and not out.is_dir():
        raise TrtkitError(f"cannot create {what} {out}: it exists and is not a folder")
    why = _probe(out)
    if why:
        raise TrtkitError(f"cannot create {what} {out}: {why}")
    return out


def check_input(path: Path | str, what: str) -> Path:
    """An input file that must exist: one line for a missing path, and another for a folder (which
    `is_file()` alone would report as missing)."""
    p = Path(path)
    if p.is_dir():
        raise TrtkitError(f"{what} {p} is a folder, not a file")
    if not p.is_file():
        raise TrtkitError(f"{what} {p} does not exist" if not os.path.lexists(p) else
                          f"{what} {p} is not a regular file")
    return p


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
def made_dir(directory: Path | str) -> Iterator[Path]:
    """Create `directory` (and parents) for the block; if the block fails, the folders it created are
    removed again where still empty, so a failed verb leaves no empty output folder behind."""
    directory = Path(directory)
    created: list[Path] = []
    p = Path(os.path.abspath(directory))
    while not os.path.lexists(p) and p != p.parent:
        created.append(p)
        p = p.parent
    ensure_writable_dir(directory)
    try:
        yield directory
    except BaseException:
        for d in created:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _write_target(dest: Path) -> Path:
    """Where an atomic write lands: the file a symlink points at (the link stays); refuses a folder or
    a device node, FIFO or socket (the last line of defence for callers that skipped check_output)."""
    _check_one(dest, f"output {dest}", [])
    return Path(os.path.realpath(dest)) if dest.is_symlink() else dest


def _stage_error(dest: Path, e: OSError) -> TrtkitError:
    return TrtkitError(f"cannot write {dest}: {e.strerror or e}")


# --------------------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def atomic_path(dest: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `dest`; rename it onto `dest` (mode as open() would give) only if
    the block succeeds. A symlink `dest` is followed."""
    dest = _write_target(Path(dest))
    ensure_writable_dir(dest.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or ".tmp", dir=dest.parent)
    except OSError as e:
        raise _stage_error(dest, e) from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        settle_mode(tmp_path, like=dest if dest.is_file() else None)
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary folder next to `dest`; it replaces `dest` only if the block succeeds. Its files
    and folders get the modes open()/mkdir() would give."""
    dest = Path(dest)
    if os.path.lexists(dest) and not dest.is_dir():
        raise TrtkitError(f"cannot create output folder {dest}: it exists and is not a folder")
    dest = Path(os.path.realpath(dest)) if dest.is_symlink() else dest
    ensure_writable_dir(dest.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as e:
        raise _stage_error(dest, e) from e
    try:
        yield tmp
        _settle_tree(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def staging_dir(dest: Path) -> tempfile.TemporaryDirectory[str]:
    """A temporary folder beside `dest` (same file system, so the outputs move into place)."""
    try:
        return tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent)
    except OSError as e:
        raise _stage_error(dest, e) from e


@contextlib.contextmanager
def staged_onnx(model: Any, dest: Path | str, *, external: bool | None = None, strict: bool = False,
                check: bool = False, staging: Path | None = None) -> Iterator[Path]:
    """Write an ONNX ModelProto beside `dest` in a temporary folder, shape-infer (and check) the written
    file, and yield its path for any further checks; on success move it onto `dest`.

    Weights go to one external data file `<dest name>.data` when `external` is True, or by default
    when the proto passes 2 GB. `staging`: a folder beside `dest` (from `staging_dir`) where the data file
    is already being written (tensors the proto holds as external stubs of it); the rest is appended. The
    data file moves first, then the model, so a model file never points
    at missing data; a stale `.data` of an earlier large output is removed. The proto is cleared once
    written: shape inference and the checker work from the file, and keeping a large model in memory
    beside them would double the peak.
    """
    import onnx

    dest = _write_target(Path(dest))
    data_dest = _write_target(dest.parent / (dest.name + ".data"))
    ensure_writable_dir(dest.parent)
    if external is None:
        external = model.ByteSize() > ONNX_PROTO_LIMIT
    data_name = dest.name + ".data"
    if staging is not None:
        external = True
        tmp_dir: Any = contextlib.nullcontext(str(staging))
    else:
        tmp_dir = staging_dir(dest)
    with tmp_dir as tmpd:
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
            staged_data = Path(tmpd) / data_name
            settle_mode(staged_data, like=data_dest if data_dest.is_file() else None)
            os.replace(staged_data, data_dest)
        elif data_dest.is_file():
            data_dest.unlink()
        settle_mode(staged, like=dest if dest.is_file() else None)
        os.replace(staged, dest)


def load_onnx(path: Path | str, external: bool = False, needs_data: bool = False) -> Any:
    """onnx.load with the one-line errors every verb gives: a missing file, a file that is not ONNX, an
    empty graph (a 0-byte file parses as one), external data missing beside it (always when `external`,
    else where `needs_data`: the caller reads weights later). `external=False` reads the structure only."""
    import onnx

    path = check_input(path, "ONNX file")
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
