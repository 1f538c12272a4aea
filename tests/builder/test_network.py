from __future__ import annotations

from pathlib import Path

import pytest
from builder_models import make_linear
from onnx import helper

from trtkit.builder.network import ParseError, network_flags, network_io, parse_onnx

pytestmark = pytest.mark.rtx


@pytest.fixture(scope="module")
def backend():  # type: ignore[no-untyped-def]
    from trtkit.backend import load_backend

    return load_backend("rtx")


def _network(backend, strongly_typed: bool = True):  # type: ignore[no-untyped-def]
    builder = backend.trt.Builder(backend.logger)
    return builder, builder.create_network(network_flags(backend, strongly_typed))


def test_flags_strongly_typed(backend) -> None:  # type: ignore[no-untyped-def]
    ndf = backend.trt.NetworkDefinitionCreationFlag
    assert network_flags(backend, True) == 1 << int(ndf.STRONGLY_TYPED)
    builder, net = _network(backend)
    assert net.get_flag(ndf.STRONGLY_TYPED)


def test_parse_and_io(backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    builder, net = _network(backend)
    parser = parse_onnx(backend, net, make_linear(tmp_path / "m.onnx", "int8", external=True))
    assert parser is not None and net.num_layers > 0
    assert network_io(net) == {"inputs": [{"name": "x", "shape": [-1, 64], "dtype": "float"}],
                               "outputs": [{"name": "y", "shape": [-1, 64], "dtype": "float"}]}


def test_parser_errors_name_node_and_operator(backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = helper.make_node("NoSuchOp", ["r"], ["y"], name="/unet/mid_block/custom/NoSuchOp", domain="custom.domain")
    path = make_linear(tmp_path / "m.onnx", extra_node=bad)
    builder, net = _network(backend)
    with pytest.raises(ParseError) as e:
        parse_onnx(backend, net, path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("TensorRT cannot parse m.onnx: ")
    assert "node /unet/mid_block/custom/NoSuchOp (NoSuchOp)" in msg
    assert e.value.errors and all(isinstance(x, str) for x in e.value.errors)
