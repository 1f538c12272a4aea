"""Fixtures of the inspector tests (helpers in inspect_helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

# The helpers module sits beside this file; put it on the path whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).parent))
from inspect_helpers import make_qdq_onnx  # noqa: E402


@pytest.fixture
def qdq_onnx(tmp_path: Path) -> Path:
    return make_qdq_onnx(tmp_path / "slice.int8.onnx")


@pytest.fixture
def fp8_onnx(tmp_path: Path) -> Path:
    return make_qdq_onnx(tmp_path / "slice.fp8.onnx", "fp8", attention_fp8=True)


@pytest.fixture(scope="session")
def rtx_plan_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real (tiny) plan built on the CPU with TensorRT-RTX, for the header checks."""
    pytest.importorskip("tensorrt_rtx")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from trtkit.backend import load_backend

    d = tmp_path_factory.mktemp("rtxplan")
    w = numpy_helper.from_array(np.eye(16, dtype=np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="/unet/mm/MatMul")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(d / "m.onnx"))
    be = load_backend("rtx")
    trt = be.trt
    builder = trt.Builder(be.logger)
    net = builder.create_network(0)
    parser = trt.OnnxParser(net, be.logger)
    assert parser.parse_from_file(str(d / "m.onnx"))
    cfg = builder.create_builder_config()
    cfg.num_compute_capabilities = 1
    cfg.set_compute_capability(trt.ComputeCapability.SM89, 0)
    cfg.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    plan = builder.build_serialized_network(net, cfg)
    assert plan is not None
    return bytes(plan)


@pytest.fixture
def plan_bytes(request: pytest.FixtureRequest) -> bytes:
    """A real TensorRT-RTX plan where tensorrt_rtx is installed; else a stand-in with a TensorRT header (for
    tests that read the saved layer files with --from-files and never load the plan)."""
    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError:
        return b"ftrt" + bytes(60)
    return request.getfixturevalue("rtx_plan_bytes")
