"""`trtkit doctor`: which checks apply, the tolerance and the verdict (plain functions), the tiny model against
torch, and the real run: an AOT build with TensorRT-RTX here, everything on a GPU with TensorRT."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trtkit.doctor import (
    CHECKS,
    FAILED,
    OK,
    RUNTIME_CHECKS,
    SKIPPED,
    Check,
    applicable,
    make_onnx,
    max_error,
    reference,
    run_checks,
    verdict,
)
from trtkit.errors import TrtkitError


def test_which_checks_apply() -> None:
    none = applicable(None, None, False, "")
    assert none["backend"] is None and all(none[n] == "no TensorRT backend" for n in CHECKS if n != "backend")
    # TensorRT-RTX on a CPU machine (this one): builds ahead of time, runs nothing.
    rtx_cpu = applicable("rtx", None, False, "no CUDA driver")
    assert rtx_cpu["build"] is None
    assert all("TensorRT-RTX" in str(rtx_cpu[n]) and "no CUDA driver" in str(rtx_cpu[n]) for n in RUNTIME_CHECKS)
    # TensorRT-RTX on a Hopper GPU: builds, but does not run there.
    why = "TensorRT-RTX does not run on compute capability 9.0 (it runs on 8.0, 8.6, 8.9, 12.x)"
    hopper = applicable("rtx", "NVIDIA H200 (sm_90)", False, why)
    assert hopper["build"] is None and all(why in str(hopper[n]) for n in RUNTIME_CHECKS)
    # Full TensorRT without a GPU cannot even build.
    trt_cpu = applicable("trt", None, False, "no CUDA driver")
    assert "builds on a GPU" in str(trt_cpu["build"]) and all(trt_cpu[n] for n in RUNTIME_CHECKS)
    # Full TensorRT on a GPU: everything.
    assert all(v is None for v in applicable("trt", "NVIDIA H200 (sm_90)", True, "").values())


def test_doctor_plan_on_turing_and_elsewhere() -> None:
    from trtkit.doctor import plan_targets_for, runs_doctor_plan

    assert plan_targets_for("rtx", "NVIDIA T4 (sm_75)", (7, 5)) == ("7.5",)
    assert plan_targets_for("rtx", "NVIDIA L4 (sm_89)", (8, 9)) == () and plan_targets_for("rtx", None, None) == ()
    assert plan_targets_for("trt", "NVIDIA T4 (sm_75)", (7, 5)) == ()
    # The backend says "not any plan" on Turing; the doctor's own plan targets 7.5, so it runs.
    assert runs_doctor_plan("rtx", "NVIDIA T4 (sm_75)", (7, 5), can_run=False)
    assert not runs_doctor_plan("rtx", "Jetson AGX Orin (sm_87)", (8, 7), can_run=False)
    assert not runs_doctor_plan("rtx", "NVIDIA H200 (sm_90)", (9, 0), can_run=False)
    assert runs_doctor_plan("rtx", "NVIDIA RTX 4090 (sm_89)", (8, 9), can_run=True)
    assert not runs_doctor_plan("rtx", None, None, can_run=False)
    assert runs_doctor_plan("trt", "NVIDIA H200 (sm_90)", (9, 0), can_run=True)


def test_max_error_and_tolerance() -> None:
    ref = np.array([[1.0, -4.0], [2.0, 0.5]], np.float32)
    assert max_error(ref, ref) == (0.0, pytest.approx(0.04))
    err, tol = max_error(ref + np.float32(0.01), ref)
    assert err == pytest.approx(0.01, rel=1e-5) and err <= tol
    err, tol = max_error(ref[::-1].copy(), ref)  # a swapped batch (wrong binding) is far outside
    assert err == pytest.approx(4.5) and err > tol
    assert max_error(np.zeros((2, 2), np.float32), np.full((2, 2), 1e-4, np.float32))[1] == pytest.approx(0.01)
    with pytest.raises(TrtkitError, match="output shape"):
        max_error(ref[:1], ref)


def _checks(**status: str) -> list[Check]:
    return [Check(n, status.get(n, OK), f"{n} detail") for n in CHECKS]


def test_verdict() -> None:
    ok, line = verdict(_checks())
    assert ok and line.startswith("all checks passed")
    cpu = _checks(gpu=SKIPPED, **dict.fromkeys(RUNTIME_CHECKS, SKIPPED))
    ok, line = verdict(cpu)
    assert ok and line == "builds work here; deserialize detail"
    ok, line = verdict(_checks(cuda_graph=FAILED))
    assert not ok and line == "1 check(s) failed: cuda_graph (cuda_graph detail)"
    ok, line = verdict(_checks(backend=FAILED, **dict.fromkeys(CHECKS[1:], SKIPPED)))
    assert not ok and "backend" in line
    ok, line = verdict(_checks(build=FAILED, match=FAILED))
    assert not ok and line.startswith("2 check(s) failed: build, match")


def test_doctor_model_against_torch(tmp_path) -> None:
    """The reference the doctor compares engines with: onnxruntime on the tiny model = torch on the same weights."""
    import onnx
    import torch
    from onnx import numpy_helper

    path = make_onnx(tmp_path / "d.onnx")
    w = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in onnx.load(str(path)).graph.initializer}
    x = np.random.default_rng(3).standard_normal((3, 4, 16, 16)).astype(np.float32)
    t = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), w["conv_w"], w["conv_b"], padding=1))
    want = (t.flatten(1) @ w["fc_w"] + w["fc_b"]).numpy()
    got = reference(path, x)
    assert got.shape == (3, 16) and np.abs(got).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.rtx
def test_doctor_here_builds_and_says_what_cannot_run(tmp_path, capsys) -> None:
    from trtkit.backend import load_backend
    from trtkit.cli import main

    be = load_backend("rtx")
    seen: list[Check] = []
    report = run_checks("rtx", workdir=tmp_path, say=seen.append)
    assert [c.name for c in report.checks] == list(CHECKS) and seen == report.checks
    by = {c.name: c for c in report.checks}
    assert by["backend"].status == OK and be.version in by["backend"].detail
    assert by["build"].status == OK and "ahead of time for compute capability 8.0, 8.6, 8.9, 12.0" in by["build"].detail
    if not be.can_run:
        assert all(by[n].status == SKIPPED and be.why_not_run in by[n].detail for n in RUNTIME_CHECKS)
        assert report.ok and report.summary.startswith("builds work here; running engines needs a GPU")
    else:  # an RTX GPU: everything ran
        assert report.ok and all(by[n].status == OK for n in RUNTIME_CHECKS), report.checks
    assert list(tmp_path.iterdir()) == []  # its work folder is gone
    assert main(["doctor", "--backend", "rtx", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["environment"]["backend"]["version"] == be.version
    assert [c["name"] for c in doc["checks"]] == list(CHECKS)
    assert main(["backend", "--backend", "rtx", "--check"]) == 0  # the same checks, as lines
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["ok", "backend", "tensorrt_rtx"] and "build" in out


def test_doctor_without_the_asked_backend_fails(capsys) -> None:
    from trtkit.backend import available
    from trtkit.cli import main

    if "trt" in available():
        pytest.skip("full TensorRT is installed here")
    assert main(["doctor", "-b", "trt"]) == 1
    out = capsys.readouterr().out
    assert "FAILED  backend" in out and "1 check(s) failed: backend" in out


@pytest.mark.tensorrt
def test_doctor_on_a_gpu_with_tensorrt(tmp_path) -> None:
    """Everything, for real: build, deserialize, run at batch 3, CUDA-graph capture + replay, match onnxruntime."""
    report = run_checks("trt", workdir=tmp_path)
    assert report.ok, report.to_json()
    assert all(c.status == OK for c in report.checks), [(c.name, c.status, c.detail) for c in report.checks]
    match = next(c for c in report.checks if c.name == "match")
    assert "run: max abs error" in match.detail and "cuda_graph: max abs error" in match.detail
