"""Layer information parsing, both TensorRT schemas and names-only, against the documented shapes
(shared/docs/tensorrt-api.md section 3; the fixtures say where each shape comes from)."""

from __future__ import annotations

import json

import pytest
from inspect_helpers import B0, TB, fixture_text

from trtkit.errors import TrtkitError
from trtkit.inspector.layers import canonical_dtype, nodes_from_name, parse_engine_information


def _by_name(info, needle):
    return next(x for x in info.layers if needle in x.name)


def test_fixtures_say_where_their_shape_comes_from():
    for name in ("trt10_detailed.json", "trt11_detailed.json", "names_only.json", "myelin_regions.json"):
        src = json.loads(fixture_text(name))["_source"]
        assert "tensorrt-api.md section 3" in src


def test_trt10_detailed():
    info = parse_engine_information(fixture_text("trt10_detailed.json"))
    assert (info.schema, info.verbosity, len(info.layers)) == ("trt10", "detailed", 18)
    assert [t.name for t in info.io] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids",
                                         "noise_pred"]
    conv1 = _by_name(info, f"{B0}/conv1/Conv")
    assert conv1.type == "CaskConvolution" and conv1.kind == "conv" and conv1.precision == "INT8"
    assert conv1.inputs[0].dtype == "INT8"
    assert conv1.inputs[0].format == "Thirty-two wide channel vectorized row major"
    assert conv1.outputs[0].dtype == "FP16" and conv1.outputs[0].format == "Channel major where channel % 8 == 0"
    assert conv1.weights_dtype == "INT8"
    assert conv1.tactic.startswith("sm89_xmma_fprop_implicit_gemm_interleaved_i8i8")
    # three ONNX nodes from the \x1f-joined metadata, in order
    assert conv1.onnx_nodes == (f"{B0}/conv1/weight_quantizer/DequantizeLinear",
                                f"{B0}/conv1/input_quantizer/DequantizeLinear", f"{B0}/conv1/Conv")
    assert conv1.nodes_from == "metadata"
    # FLOPs = 2 * N*K*H*W * C/groups * kh*kw, from the layer's own dimensions
    assert conv1.flops() == 2 * (2 * 32 * 32 * 32) * 32 * 9
    ff = _by_name(info, f"{TB}/ff/net.0/proj/MatMul")
    assert ff.kind == "matmul" and ff.precision == "INT8" and ff.flops() == 2 * (2 * 256 * 512) * 64
    q = _by_name(info, f"{B0}/conv1/input_quantizer/QuantizeLinear")
    assert q.kind == "qdq" and q.origin == "QDQ"  # a Q that runs as its own reformat layer
    ref = info.layers[0]
    assert ref.kind == "reformat" and ref.reformat_for == "/unet/conv_in/Conv" and ref.precision == "FP32"
    myelin = _by_name(info, "ForeignNode")
    assert myelin.kind == "attention" and myelin.type == "Myelin" and len(myelin.onnx_nodes) == 8
    assert myelin.flops() is None
    assert myelin.extra["UnknownFutureField"] == {"MyelinGraphId": 7}  # unknown fields kept
    assert "_source" in info.extra
    assert _by_name(info, f"{TB}/attn2/Softmax").kind == "other"


def test_trt11_detailed_separate_format_and_datatype():
    info = parse_engine_information(fixture_text("trt11_detailed.json"))
    assert (info.schema, info.verbosity, len(info.layers)) == ("trt11", "detailed", 18)
    sample = info.io[0]
    assert (sample.name, sample.mode, sample.dtype, sample.dims) == ("sample", "Input", "FP32", (2, 4, 32, 32))
    assert sample.profiles[0]["OptShape"] == [2, 4, 32, 32]
    assert info.io[-1].mode == "Output"
    conv1 = _by_name(info, f"{B0}/conv1/Conv")
    assert conv1.precision == "FP8" and conv1.inputs[0].dtype == "FP8" and conv1.inputs[0].format == "Row major linear"
    assert conv1.weights_dtype == "FP8"
    # Myelin region: FP16 I/O, FP8 named by the kernel (e4m3)
    myelin = _by_name(info, "ForeignNode")
    assert myelin.inputs[0].dtype == "FP16" and myelin.precision == "FP8"
    assert [x.precision for x in info.layers].count("FP8") == 5


def test_names_only():
    info = parse_engine_information(fixture_text("names_only.json"))
    assert (info.schema, info.verbosity) == ("trt10", "layer_names_only")
    assert all(x.precision == "?" and x.nodes_from == "name" for x in info.layers)
    myelin = _by_name(info, "ForeignNode")
    assert myelin.kind == "myelin"
    assert myelin.onnx_nodes == (f"{TB}/attn1/to_q/MatMul", f"{TB}/attn1/MatMul_1")  # first...last only
    assert _by_name(info, f"{B0}/conv1/Conv").kind == "conv"
    assert _by_name(info, f"{TB}/ff/net.2/weight_quantizer/DequantizeLinear + ").kind == "matmul"
    assert _by_name(info, f"{B0}/conv2/input_quantizer/DequantizeLinear").kind == "qdq"


@pytest.mark.parametrize("text,expected", [
    ("Row major linear FP32", "FP32"), ("Row major linear FP16 format", "FP16"), ("Half", "FP16"),
    ("Float", "FP32"), ("Four wide channel vectorized row major Int8 format", "INT8"), ("FP8", "FP8"),
    ("kFP8", "FP8"), ("BFloat16", "BF16"), ("Int32", "INT32"), ("Bool", "BOOL"), ("Row major linear", None),
    (None, None),
])
def test_canonical_dtype(text, expected):
    assert canonical_dtype(text) == expected


def test_nodes_from_name():
    assert nodes_from_name("a + b + c") == ("a", "b", "c")
    assert nodes_from_name("{ForeignNode[/x/MatMul.../x/Softmax]}") == ("/x/MatMul", "/x/Softmax")
    assert nodes_from_name("Reformatting CopyNode for Input Tensor 0 to /x/Conv") == ()


def test_unknown_and_odd_entries_are_not_fatal():
    doc = {"Layers": [
        {"Name": "n1", "LayerType": "SomethingNew", "Inputs": [{"Name": "t", "Weird": 1, "Dimensions": ["?"]}],
         "Metadata": "[ONNX Layer: /unet/a/MatMul]\x1e[ONNX Layer: /unet/b/Add] | Local Function: f"},
        42, "plain name",
    ], "NewTopLevel": {"k": 1}}
    info = parse_engine_information(doc)
    assert info.schema == "unknown" and len(info.layers) == 3
    assert info.layers[0].onnx_nodes == ("/unet/a/MatMul", "/unet/b/Add")
    assert info.layers[0].inputs[0].dims is None and info.layers[0].extra["Inputs.extra"] == {0: {"Weird": 1}}
    assert info.layers[1].extra == {"raw": 42}
    assert info.extra == {"NewTopLevel": {"k": 1}}
    assert parse_engine_information([{"Name": "x"}]).layers[0].name == "x"  # a bare list of layers


@pytest.mark.parametrize("bad,msg", [("{not json", "not valid JSON"), ('{"Bindings": []}', "no 'Layers'"),
                                     ('{"Layers": 3}', "not a list")])
def test_bad_layer_information(bad, msg):
    with pytest.raises(TrtkitError, match=msg):
        parse_engine_information(bad)


def test_myelin_region_precision_reads_every_boundary_and_inner_layers():
    """Review finding 16: a Myelin region's first input does not tell what it computes in."""
    info = parse_engine_information(fixture_text("myelin_regions.json"))
    cast_norm, attn, time_proj, ff = info.layers
    assert all(x.is_myelin for x in info.layers)
    # FP32 network input cast to FP16 inside the region: the first input alone said FP32.
    assert cast_norm.inputs[0].dtype == "FP32" and cast_norm.precision == "mixed"
    assert attn.precision == "FP16" and time_proj.precision == "FP32"
    # FP32 boundaries, FP16 inner layers (listed under a key the parser does not know by name).
    assert ff.inputs[0].dtype == "FP32" and ff.precision == "FP16"
    # The documented fixtures keep their answers: FP16 attention region, FP8 named by the kernel (TRT 11).
    assert _by_name(parse_engine_information(fixture_text("trt10_detailed.json")), "ForeignNode").precision == "FP16"
    assert _by_name(parse_engine_information(fixture_text("trt11_detailed.json")), "ForeignNode").precision == "FP8"
    # A non-Myelin layer with an FP32 input and FP16 output (a reformat) still reads its input type.
    ref = _by_name(parse_engine_information(fixture_text("trt10_detailed.json")), "Reformatting CopyNode for Input")
    assert not ref.is_myelin and ref.precision == "FP32"
