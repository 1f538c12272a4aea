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


def test_rtx_runnable_compute_capabilities() -> None:
    """Review finding 13: TensorRT-RTX's own list is 8.0 8.6 8.9 12.0 12.1 >12.0; Turing only for 7.5 plans."""
    from trtkit.backend import rtx_runs_on

    for cc in ((8, 0), (8, 6), (8, 9), (12, 0), (12, 1), (13, 0)):
        assert rtx_runs_on(cc) == (True, "")
    for cc in ((8, 7), (9, 0), (10, 0), (7, 0), (6, 1)):  # Orin, Hopper, Blackwell datacenter, Volta, Pascal
        ok, why = rtx_runs_on(cc)
        assert not ok and f"{cc[0]}.{cc[1]}" in why
    assert not rtx_runs_on((7, 5))[0] and "--target-cc 7.5" in rtx_runs_on((7, 5))[1]
    assert not rtx_runs_on((7, 5), ["8.0", "8.6", "8.9", "12.0"])[0]  # the portable default has no Turing
    assert rtx_runs_on((7, 5), ["7.5", "8.9"]) == (True, "")
    assert rtx_runs_on(None) == (False, "no CUDA GPU")


def test_tensorrt_messages_kept() -> None:
    """Review finding 7: VERBOSE never reaches Python logging, INFO only with --verbose."""
    import logging

    from trtkit.backend import keep_message, last_errors

    assert not keep_message(logging.DEBUG, True) and not keep_message(logging.DEBUG, False)
    assert keep_message(logging.INFO, True) and not keep_message(logging.INFO, False)
    assert all(keep_message(lv, False) for lv in (logging.WARNING, logging.ERROR, logging.CRITICAL))
    msgs = [(logging.ERROR, "first error\ndetail"), (logging.INFO, "info"), (logging.WARNING, "warn"),
            (logging.CRITICAL, "internal error"), (logging.INFO, "after")]
    assert last_errors(msgs) == ["internal error"]
    assert last_errors(msgs, 5) == ["first error", "internal error"]


@pytest.mark.rtx
def test_real_logger_drops_verbose_and_info() -> None:
    """The logger TensorRT-RTX calls: a real parse at VERBOSE severity leaves nothing below WARNING."""
    import logging

    b = load_backend("rtx")
    lg, sev = b.logger, b.trt.ILogger.Severity
    lg.messages.clear()
    builder = b.trt.Builder(lg)  # TensorRT-RTX logs INFO/VERBOSE lines while it sets up
    lg.log(sev.VERBOSE, "verbose line")
    lg.log(sev.INFO, "info line")
    lg.log(sev.ERROR, "error line")
    assert builder is not None
    assert all(lv >= logging.WARNING for lv, _ in lg.messages) and (logging.ERROR, "error line") in lg.messages
    trt_log = logging.getLogger("trtkit.tensorrt")
    old = trt_log.level
    trt_log.setLevel(logging.INFO)  # what --verbose does (through the root logger)
    try:
        lg.log(sev.INFO, "info wanted")
    finally:
        trt_log.setLevel(old)
    assert (logging.INFO, "info wanted") in lg.messages


@pytest.mark.rtx
def test_vendored_rtx_stubs_match_the_installed_module() -> None:
    """stubs/mypy-rtx.ini checks against stubs/rtx; they must be of the TensorRT-RTX release installed
    (regenerate: pip install pybind11-stubgen==3.0.0 && python3 stubs/gen_rtx_stubs.py)."""
    from pathlib import Path

    vendored = (Path(__file__).parents[1] / "stubs" / "rtx" / "VERSION").read_text().split()[0]
    installed = load_backend("rtx").version
    assert vendored.split(".")[:2] == installed.split(".")[:2], (
        f"stubs/rtx are of tensorrt_rtx {vendored}, {installed} is installed: run python3 stubs/gen_rtx_stubs.py")
