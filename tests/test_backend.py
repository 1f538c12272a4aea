from __future__ import annotations

import subprocess
import sys

import pytest

from trtkit.backend import INSTALL_HINT, load_backend
from trtkit.errors import TrtkitError


def test_unknown_backend_name() -> None:
    with pytest.raises(TrtkitError, match="unknown backend 'cuda'"):
        load_backend("cuda")


def test_no_backend_installed_message() -> None:
    # Hide both modules from the import system in a child process: a real "nothing installed" run.
    code = ("import sys; sys.modules['tensorrt'] = None; sys.modules['tensorrt_rtx'] = None\n"
            "import importlib.util as u; real = u.find_spec\n"
            "u.find_spec = lambda n, *a: None if n in ('tensorrt', 'tensorrt_rtx') else real(n, *a)\n"
            "from trtkit.cli import main; sys.exit(main(['backend']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"error: no TensorRT backend is installed; {INSTALL_HINT}"]


@pytest.mark.rtx
def test_rtx_backend_capabilities() -> None:
    b = load_backend("rtx")
    assert b.name == "rtx" and b.trt.__name__ == "tensorrt_rtx"
    assert b.strongly_typed_only and b.precision_flags == ()
    assert hasattr(b.trt, "Builder") and hasattr(b.trt, "OnnxParser")
    if b.gpu is None:
        assert not b.can_run and b.why_not_run


@pytest.mark.tensorrt
def test_tensorrt_backend_capabilities() -> None:
    b = load_backend("trt")
    assert b.major in (10, 11)
    # 11.x removed the precision flags: strong typing is the only mode.
    assert b.strongly_typed_only == (not hasattr(b.trt.BuilderFlag, "FP16"))
    assert b.can_run
