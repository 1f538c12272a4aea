"""trtkit._files: the output-path checks every verb runs first, and the atomic writers (modes, no
half-written file). Device nodes and FIFOs are made in tmp_path, never /dev's own."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from trtkit._files import (
    atomic_dir,
    atomic_path,
    check_input,
    check_output,
    check_output_dir,
    made_dir,
    write_text_atomic,
)
from trtkit.errors import TrtkitError

ROOT = Path(__file__).resolve().parents[1]
SETPRIV = shutil.which("setpriv")


def char_node(path: Path) -> Path:
    """A /dev/null twin (char 1,3) in tmp_path; mknod needs root (CAP_MKNOD): skip without it."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod needs root")
    return path


def specials(tmp_path: Path) -> dict[str, Path]:
    out = {"fifo": tmp_path / "fifo"}
    os.mkfifo(out["fifo"])
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    sock.close()
    out["socket"] = tmp_path / "sock"
    out["char"] = char_node(tmp_path / "mynull")
    out["link"] = tmp_path / "link-to-null"
    out["link"].symlink_to(out["char"])
    return out


def test_special_files_are_refused_and_left_as_they_are(tmp_path: Path) -> None:
    for kind, p in specials(tmp_path).items():
        before = os.lstat(p)
        with pytest.raises(TrtkitError, match="not a regular file; refusing to replace it") as e:
            check_output(p)
        assert "\n" not in str(e.value)
        # the writers refuse too (the last line of defence for Python callers that skip the check)
        with pytest.raises(TrtkitError, match="refusing to replace"):
            write_text_atomic(p, "x")
        after = os.lstat(p)
        assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev), kind
    with pytest.raises(TrtkitError, match=r"link-to-null \(a symlink to .*mynull\) is a character device"):
        check_output(tmp_path / "link-to-null")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["fifo", "link-to-null", "mynull", "sock"]


def test_a_sidecar_that_is_a_device_is_refused(tmp_path: Path) -> None:
    char_node(tmp_path / "x.json")
    with pytest.raises(TrtkitError, match=r"x.json \(written beside x.plan\) is a character device"):
        check_output(tmp_path / "x.plan", sidecars=lambda o: [o.with_suffix(".json")])


def test_a_folder_gets_the_default_name(tmp_path: Path) -> None:
    d = tmp_path / "adir"
    d.mkdir()
    assert check_output(d, default_name="unet.plan") == d / "unet.plan"
    assert check_output(str(tmp_path / "new") + os.sep, default_name="calib.json") == tmp_path / "new" / "calib.json"
    with pytest.raises(TrtkitError, match="adir is a folder; give a file name"):
        check_output(d)
    (d / "unet.plan").mkdir()  # the default name is itself a folder
    with pytest.raises(TrtkitError, match="unet.plan is a folder"):
        check_output(d, default_name="unet.plan")
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_an_input_is_never_an_output(tmp_path: Path) -> None:
    src = tmp_path / "same.onnx"
    src.write_bytes(b"onnx")
    (tmp_path / "link.onnx").symlink_to(src)
    os.link(src, tmp_path / "hard.onnx")
    for spelling in (src, Path(f"{tmp_path}/./same.onnx"), tmp_path / "link.onnx", tmp_path / "hard.onnx"):
        with pytest.raises(TrtkitError, match="must not overwrite the input"):
            check_output(spelling, inputs=[src])
    # a sidecar onto an input: build -o calib.plan --calib calib.json would write calib.json
    with pytest.raises(TrtkitError, match=r"calib.json \(written beside calib.plan\) must not overwrite the input"):
        check_output(tmp_path / "calib.plan", inputs=[tmp_path / "calib.json"],
                     sidecars=lambda o: [o.with_suffix(".json")])
    assert src.read_bytes() == b"onnx"


def test_parents_that_cannot_hold_files(tmp_path: Path) -> None:
    with pytest.raises(TrtkitError, match="cannot write output /proc/q.onnx: /proc does not accept new files"):
        check_output("/proc/q.onnx")
    with pytest.raises(TrtkitError, match="cannot create output folder /proc/x"):
        check_output("/proc/x/q.onnx")
    with pytest.raises(TrtkitError, match="cannot create output folder /proc/x"):
        check_output_dir("/proc/x")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrtkitError, match="cannot create output folder .*file/sub: .*file is not a folder"):
        check_output(blocker / "sub" / "x.plan")
    with pytest.raises(TrtkitError, match="exists and is not a folder"):
        check_output_dir(blocker)
    assert check_output(tmp_path / "a" / "b" / "x.plan") == tmp_path / "a" / "b" / "x.plan"
    assert not (tmp_path / "a").exists()


def test_input_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    with pytest.raises(TrtkitError, match="ONNX file .*adir is a folder, not a file"):
        check_input(tmp_path / "adir", "ONNX file")
    with pytest.raises(TrtkitError, match="does not exist"):
        check_input(tmp_path / "missing", "ONNX file")


def test_symlink_to_a_file_is_written_through(tmp_path: Path) -> None:
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert check_output(link) == link
    write_text_atomic(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]


def test_failed_or_cancelled_write_keeps_the_old_file(tmp_path: Path) -> None:
    dest = tmp_path / "x.plan"
    dest.write_text("old")
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise exc
        assert dest.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.plan"]


def test_made_dir_removes_what_it_made_on_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), made_dir(tmp_path / "a" / "b"):
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with made_dir(tmp_path / "a" / "b"):
        pass
    assert (tmp_path / "a" / "b").is_dir()


MODES_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    from onnx import helper, numpy_helper
    from trtkit._files import atomic_dir, staged_onnx, write_text_atomic
    root = sys.argv[1]
    write_text_atomic(f"{root}/sub/new.json", "{}")
    keep = f"{root}/kept.json"
    open(keep, "w").close(); os.chmod(keep, 0o640)
    write_text_atomic(keep, "{}")  # open() keeps an existing file's mode; so does the atomic writer
    with atomic_dir(f"{root}/model") as d:
        os.mkdir(d / "unet"); (d / "unet" / "w.safetensors").write_bytes(b"x")
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", 1, [1, 64])],
                          [helper.make_tensor_value_info("y", 1, [1, 64])], [w])
    with staged_onnx(helper.make_model(g), f"{root}/m.onnx", external=True):
        pass
""")


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_honour_the_umask(tmp_path: Path, umask: int, file_mode: int, dir_mode: int) -> None:
    subprocess.run([sys.executable, "-c", MODES_SCRIPT, str(tmp_path)], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=lambda: os.umask(umask))
    mode = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert mode == {"sub": dir_mode, "sub/new.json": file_mode, "kept.json": 0o640, "model": dir_mode,
                    "model/unet": dir_mode, "model/unet/w.safetensors": file_mode, "m.onnx": file_mode,
                    "m.onnx.data": file_mode}


# --------------------------------------------------------------------------- as a user without root's bypass

def as_user(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run as uid/gid 65534 (nobody). It keeps CAP_DAC_READ_SEARCH only, to read the Python installed
    under /root (0700): it bypasses read and search checks, never write checks."""
    return subprocess.run([SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps",
                           "+dac_read_search", "--ambient-caps", "+dac_read_search", *args],
                          capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(cwd), "COLUMNS": "200"})


@pytest.fixture
def user_dir() -> Iterator[Path]:
    """A folder the other user can reach (pytest's tmp_path is 0700 root's), with a read-only `ro/`."""
    if SETPRIV is None or os.geteuid() != 0:
        pytest.skip("needs setpriv and root to switch to another user")
    d = Path(tempfile.mkdtemp(prefix="trtkit-user-"))
    d.chmod(0o777)
    (d / "ro").mkdir()
    (d / "ro").chmod(0o555)
    yield d
    shutil.rmtree(d)


def test_read_only_folder_as_user(user_dir: Path) -> None:
    script = ("from trtkit._files import check_output, check_output_dir\n"
              "from trtkit.errors import TrtkitError\n"
              "for f, a in ((check_output, 'ro/x.plan'), (check_output, 'ro/new/x.plan'), (check_output_dir, 'ro/d')):\n"
              "    try:\n        f(a); print('accepted', a)\n    except TrtkitError as e:\n        print(e)\n")
    p = as_user(sys.executable, "-c", script, cwd=user_dir)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        f"cannot write output ro/x.plan: {user_dir}/ro is not writable (Permission denied)",
        f"cannot create output folder ro/new: {user_dir}/ro is not writable (Permission denied)",
        f"cannot create output folder ro/d: {user_dir}/ro is not writable (Permission denied)"]
    assert list((user_dir / "ro").iterdir()) == []


def test_atomic_dir_refuses_a_file_and_replaces_a_folder(tmp_path: Path) -> None:
    node = char_node(tmp_path / "node")
    with pytest.raises(TrtkitError, match="exists and is not a folder"), atomic_dir(node):
        pass
    assert stat.S_ISCHR(os.lstat(node).st_mode)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old").write_text("x")
    with atomic_dir(tmp_path / "model") as d:
        (d / "new").write_text("y")
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["new"]
