"""Output paths through every verb that writes, as the newcomer trial typed them
(shared/docs/findings/newcomer-trial.md, problems 1, 2, 3, 5, 6, 13, 15): a folder as -o, a device node,
the input itself, /proc, a read-only folder as another user; each refused in one line before any work,
or written into the folder under the verb's default name. Nodes are made in tmp_path, never /dev's."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtkit.backend import gpu_info
from trtkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = gpu_info()[0] is None
SETPRIV = shutil.which("setpriv")
RTX_BUILD = ("--shapes", "x:4x64", "--backend", "rtx", "--target-cc", "8.9", "--workspace", "256M")


def run_cli(*args: str, prefix: tuple[str, ...] = (), cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "trtkit", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200",
                               **({"HOME": str(cwd)} if cwd else {})})


Cli = Callable[..., subprocess.CompletedProcess]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture) -> Cli:
    """The CLI in this process (main(), what `python -m trtkit` runs): no second import of torch."""
    def call(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        rc = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out, err)
    return call


def one_line_error(p: subprocess.CompletedProcess, needle: str) -> str:
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def char_node(path: Path) -> Path:
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null twin
    except PermissionError:
        pytest.skip("mknod needs root")
    return path


def is_node(path: Path) -> bool:
    return stat.S_ISCHR(os.lstat(path).st_mode)


def linear_onnx(path: Path) -> Path:
    """x[4,64] @ W: builds in a second with TensorRT-RTX."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "fc.weight")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "fc.weight"], ["y"], name="/fc/MatMul")], "linear",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


UMASK = os.umask(0o022)
os.umask(UMASK)
FILE_MODE, DIR_MODE = 0o666 & ~UMASK, 0o777 & ~UMASK


# --------------------------------------------------------------------------- problem 1: a folder as -o

def test_quantize_into_a_folder(tiny_unet_onnx: Path, tmp_path: Path, cli: Cli) -> None:
    adir = tmp_path / "adir"
    adir.mkdir()
    p = cli("quantize", str(tiny_unet_onnx), "--int8", "-o", str(adir))
    assert p.returncode == 0, p.stderr
    out = adir / "unet.int8.onnx"
    onnx.checker.check_model(str(out))
    assert [x.name for x in adir.iterdir()] == ["unet.int8.onnx"] and mode(out) == FILE_MODE  # problem 2


@pytest.mark.rtx
def test_build_into_a_folder(tmp_path: Path, cli: Cli) -> None:
    src = linear_onnx(tmp_path / "m.onnx")
    adir = tmp_path / "engines"
    adir.mkdir()
    p = cli("build", str(src), *RTX_BUILD, "-o", str(adir))
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in adir.iterdir()) == ["m.json", "m.plan"]
    assert mode(adir / "m.plan") == mode(adir / "m.json") == FILE_MODE  # problem 2: was 0600


def test_calibrate_into_a_folder(tiny_model_dir: Path, tmp_path: Path, cli: Cli) -> None:
    adir = tmp_path / "adir"
    adir.mkdir()
    p = cli("calibrate", str(tiny_model_dir), "--num-prompts", "1", "--batch", "1", "--steps", "1",
                "--height", "64", "--width", "64", "--device", "cpu", "-o", str(adir))
    assert p.returncode == 0, p.stderr
    assert [x.name for x in adir.iterdir()] == ["calib.json"] and mode(adir / "calib.json") == FILE_MODE
    assert not (tmp_path / "adir.partial.npz").exists()


def test_inspect_html_into_a_folder(tiny_unet_onnx: Path, tmp_path: Path, cli: Cli) -> None:
    adir = tmp_path / "adir"
    adir.mkdir()
    p = cli("inspect", str(tiny_unet_onnx), "--no-layers", "--html", str(adir))
    assert p.returncode == 0, p.stderr
    assert [x.name for x in adir.iterdir()] == ["unet.html"] and mode(adir / "unet.html") == FILE_MODE


def test_run_into_a_folder(tiny_model_dir: Path, tmp_path: Path, cli: Cli) -> None:
    p = cli("run", str(tiny_model_dir), "--prompt", "x", "--steps", "1", "--height", "64", "--width", "64",
                "--device", "cpu", "-o", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert [x.name for x in tmp_path.iterdir()] == ["out.png"] and mode(tmp_path / "out.png") == FILE_MODE
    assert f"wrote {tmp_path / 'out.png'} " in p.stdout


def test_demo_model_folder_modes(tiny_model_dir: Path) -> None:
    """Problem 2: the demo's model/ (make_tiny_pipeline, through atomic_dir) was 0700 with 0600 files."""
    modes = {mode(p) for p in [tiny_model_dir, *tiny_model_dir.rglob("*")] if p.is_dir()}
    assert modes == {DIR_MODE}
    assert {mode(p) for p in tiny_model_dir.rglob("*") if p.is_file()} == {FILE_MODE}


# --------------------------------------------------------------------------- problem 3: device nodes

def test_device_node_outputs_are_never_replaced(tiny_model_dir: Path, tiny_unet_onnx: Path, tmp_path: Path, cli: Cli) -> None:
    node = char_node(tmp_path / "mynull")
    png = char_node(tmp_path / "mynull.png")
    link = tmp_path / "link"
    link.symlink_to(node)
    runs = {
        "quantize": ("quantize", str(tiny_unet_onnx), "--int8", "-o", str(node)),
        "build": ("build", str(tiny_unet_onnx), "--fp16", "-p", "tiny-256", "-o", str(node)),
        "build via link": ("build", str(tiny_unet_onnx), "--fp16", "-p", "tiny-256", "-o", str(link)),
        "inspect": ("inspect", str(tiny_unet_onnx), "--html", str(node)),
        "calibrate": ("calibrate", str(tiny_model_dir), "--num-prompts", "1", "--steps", "1", "-o", str(node)),
        "run": ("run", str(tiny_model_dir), "--prompt", "x", "--device", "cpu", "-o", str(png)),
    }
    for verb, args in runs.items():
        one_line_error(cli(*args), "is a character device, not a regular file; refusing to replace it")
        assert is_node(node) and is_node(png), verb
    one_line_error(cli("export", str(tiny_model_dir), "-p", "tiny-256", "-o", str(node)), "not a folder")
    one_line_error(cli("demo", "-o", str(node)), "cannot create demo folder")
    # the plan's metadata sidecar: build -o x.plan where x.json is a node
    char_node(tmp_path / "x.json")
    one_line_error(cli("build", str(tiny_unet_onnx), "--fp16", "-p", "tiny-256", "-o", str(tmp_path / "x.plan")),
                   "x.json (written beside x.plan) is a character device")
    assert is_node(node) and is_node(tmp_path / "x.json") and not (tmp_path / "x.plan").exists()
    assert not list(tmp_path.glob(".*")) and not list(tmp_path.glob("*.partial.npz"))


def test_export_onto_a_fifo(tiny_model_dir: Path, tmp_path: Path, cli: Cli) -> None:
    os.mkfifo(tmp_path / "unet.onnx")
    one_line_error(cli("export", str(tiny_model_dir), "-p", "tiny-256", "-o", str(tmp_path)),
                   "is a FIFO, not a regular file")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "unet.onnx").st_mode)


# --------------------------------------------------------------------------- problem 5: the output is an input

def test_build_onto_its_input(tmp_path: Path, cli: Cli) -> None:
    src = linear_onnx(tmp_path / "same.onnx")
    before = src.read_bytes()
    (tmp_path / "link.onnx").symlink_to(src)
    for out in (str(src), f"{tmp_path}/./same.onnx", str(tmp_path / "link.onnx")):
        one_line_error(cli("build", str(src), *RTX_BUILD, "-o", out), "must not overwrite the input")
    # the .json sidecar onto the calibration file: build -o calib.plan --calib calib.json
    calib = tmp_path / "calib.json"
    calib.write_text("{}")
    one_line_error(cli("build", str(src), "--int8", "--calib", str(calib), *RTX_BUILD,
                           "-o", str(tmp_path / "calib.plan")), "calib.json (written beside calib.plan) must not "
                                                                "overwrite the input")
    assert src.read_bytes() == before and calib.read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.json", "link.onnx", "same.onnx"]


def test_other_verbs_onto_their_inputs(tiny_model_dir: Path, tiny_unet_onnx: Path, tmp_path: Path, cli: Cli) -> None:
    cfg = tiny_model_dir / "unet" / "config.json"
    before = cfg.read_bytes()
    one_line_error(cli("calibrate", str(tiny_model_dir), "--steps", "1", "-o", str(cfg)),
                   "must not overwrite the input")
    assert cfg.read_bytes() == before
    onnx_copy = tmp_path / "u.onnx"
    shutil.copy(tiny_unet_onnx, onnx_copy)
    for out in (onnx_copy, tmp_path / "u.json"):
        one_line_error(cli("inspect", str(onnx_copy), "--html", str(out)), "must not overwrite the input")
    one_line_error(cli("quantize", str(onnx_copy), "--int8", "-o", f"{tmp_path}/./u.onnx"),
                   "must not overwrite the input")
    assert onnx_copy.read_bytes() == tiny_unet_onnx.read_bytes()


# --------------------------------------------------------------------------- problem 6: /proc

def test_outputs_under_proc(tiny_model_dir: Path, tiny_unet_onnx: Path, cli: Cli) -> None:
    for args in (("quantize", str(tiny_unet_onnx), "--int8", "-o", "/proc/q.onnx"),
                 ("build", str(tiny_unet_onnx), "--fp16", "-p", "tiny-256", "-o", "/proc/u.plan"),
                 ("inspect", str(tiny_unet_onnx), "--html", "/proc/r.html"),
                 ("calibrate", str(tiny_model_dir), "-o", "/proc/c.json"),
                 ("run", str(tiny_model_dir), "--prompt", "x", "--device", "cpu", "-o", "/proc/x.png"),
                 ("run", str(tiny_model_dir), "--prompt", "x", "--device", "cpu", "-o", "/proc/x/y.png"),
                 ("export", str(tiny_model_dir), "-o", "/proc/x/")):
        err = one_line_error(cli(*args), "/proc")
        assert "does not accept new files" in err, err


# --------------------------------------------------------------------------- problem 13

def test_input_folders_say_folder(tiny_unet_onnx: Path, tmp_path: Path, cli: Cli) -> None:
    adir = tmp_path / "adir"
    adir.mkdir()
    for args, needle in ((("quantize", str(adir), "--int8"), "ONNX file"), (("build", str(adir), "--fp16"), "ONNX file"),
                         (("quantize", str(tiny_unet_onnx), "--int8", "--calib", str(adir)), "calibration file"),
                         (("build", str(tiny_unet_onnx), "--int8", "--calib", str(adir), "-p", "tiny-256"),
                          "calibration file")):
        err = one_line_error(cli(*args, "-o", str(tmp_path / "out.x")), needle)
        assert err.endswith("adir is a folder, not a file"), err
    assert [p.name for p in tmp_path.iterdir()] == ["adir"]


def test_failed_export_leaves_no_empty_folder(tiny_model_dir: Path, tmp_path: Path, cli: Cli) -> None:
    p = cli("export", str(tiny_model_dir), "-p", "tiny-256", "--shapes", "foo:2x4x32x32",
                "-o", str(tmp_path / "ex" / "sub"))
    one_line_error(p, "'foo' is not an input")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- problem 15: fail fast

@pytest.fixture
def broken_model(tmp_path: Path) -> Path:
    """A folder a pipeline load would reject: an error about it means the load was reached."""
    d = tmp_path / "broken"
    d.mkdir()
    (d / "model_index.json").write_text("{not json")
    return d


@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU refusal")
def test_engines_without_gpu_refused_before_the_pipeline_loads(broken_model: Path, tmp_path: Path, cli: Cli,
                                                               rtx_unet_builds: dict) -> None:
    engines = tmp_path / "engines"
    engines.mkdir()
    # a real plan: its header is read (which TensorRT runs it) before the GPU check, both before the load
    shutil.copy(rtx_unet_builds["fp16"][1].plan, engines / "unet.plan")
    for verb, extra in (("run", ("--prompt", "x", "-o", str(tmp_path / "x.png"))), ("bench", ())):
        one_line_error(cli(verb, str(broken_model), "--engines", str(engines), *extra),
                       "TensorRT engines need a CUDA GPU; none found")


def test_run_output_checked_before_the_pipeline_loads(broken_model: Path, tmp_path: Path, cli: Cli) -> None:
    one_line_error(cli("run", str(broken_model), "--prompt", "x", "--device", "cpu", "-o", str(tmp_path / "x.txt")),
                   "must end in .png, .jpg or .webp")
    one_line_error(cli("run", str(broken_model), "--prompt", "x", "--device", "cpu", "-o",
                           str(broken_model / "model_index.json")), "must not overwrite the input")


# --------------------------------------------------------------------------- as a user without root's bypass

@pytest.fixture
def user_dir(tiny_model_dir: Path, tiny_unet_onnx: Path) -> Iterator[Path]:
    """A folder uid 65534 can reach (pytest's tmp_path is root's 0700) with copies of the inputs and a
    read-only `ro/`."""
    if SETPRIV is None or os.geteuid() != 0:
        pytest.skip("needs setpriv and root to switch to another user")
    d = Path(tempfile.mkdtemp(prefix="trtkit-user-"))
    shutil.copytree(tiny_model_dir, d / "model")
    shutil.copy(tiny_unet_onnx, d / "unet.onnx")
    for p in (d, *d.rglob("*")):
        p.chmod(0o777 if p.is_dir() else 0o666)
    (d / "ro").mkdir()
    (d / "ro").chmod(0o555)
    yield d
    shutil.rmtree(d)


# uid/gid 65534 keeping only CAP_DAC_READ_SEARCH, to read the Python under /root (0700): it bypasses
# read and search checks, never write checks.
AS_USER = (SETPRIV or "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps", "+dac_read_search",
           "--ambient-caps", "+dac_read_search")


def test_read_only_folder_as_user(user_dir: Path) -> None:
    runs = (("quantize", "unet.onnx", "--int8", "-o", "ro/q.onnx"),
            ("quantize", "unet.onnx", "--int8", "-o", "ro"),
            ("build", "unet.onnx", "--fp16", "-p", "tiny-256", "-o", "ro/u.plan"),
            ("inspect", "unet.onnx", "--html", "ro/r.html"),
            ("calibrate", "model", "-o", "ro/c.json"),
            ("run", "model", "--prompt", "x", "--device", "cpu", "-o", "ro/x.png"),
            ("export", "model", "-p", "tiny-256", "-o", "ro/onnx"),
            ("demo", "-o", "ro/demo"))
    for args in runs:
        p = run_cli(*args, prefix=AS_USER, cwd=user_dir)
        one_line_error(p, "is not writable (Permission denied)")
        assert p.stdout == "", args  # the demo printed no stage: refused before the first
    assert list((user_dir / "ro").iterdir()) == []
    json.loads((user_dir / "model" / "model_index.json").read_text())
