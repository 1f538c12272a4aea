"""Bad plans give one-line errors; real plans are inspected where this machine can run them."""

from __future__ import annotations

import json

import pytest
from inspect_helpers import write_engine

from trtkit.errors import TrtkitError
from trtkit.inspector.engine_report import load_engine
from trtkit.inspector.plan_file import read_plan_header


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("content,needle", [
    (b"hello, I am a text file\n" * 4, "is not a TensorRT plan (it is a text file)"),
    (b'{"Layers": []}', "is not a TensorRT plan (it is JSON text)"),
    (b"\x08\x0a\x12\x07pytorch" + bytes(60), "it looks like an ONNX model"),
    (bytes(range(200, 256)) * 2, "is not a TensorRT plan (unknown header"),
    (b"", "is empty"),
])
def test_not_a_plan(tmp_path, content, needle):
    p = tmp_path / "x.plan"
    p.write_bytes(content)
    with pytest.raises(TrtkitError) as ei:
        load_engine(p)
    assert needle in _one_line(ei)


def test_real_onnx_renamed_to_plan(tmp_path, qdq_onnx):
    p = tmp_path / "model.plan"
    p.write_bytes(qdq_onnx.read_bytes())
    with pytest.raises(TrtkitError, match="looks like an ONNX model"):
        load_engine(p)


def test_missing_file(tmp_path):
    with pytest.raises(TrtkitError, match="does not exist"):
        load_engine(tmp_path / "nope.plan")


@pytest.mark.rtx
def test_rtx_header(rtx_plan_bytes, tmp_path):
    from trtkit.backend import load_backend

    p = tmp_path / "m.plan"
    p.write_bytes(rtx_plan_bytes)
    h = read_plan_header(p)
    assert h.flavour == "rtx" and h.size_field == len(rtx_plan_bytes)
    assert h.version_str == load_backend("rtx").version  # e.g. 1.7.1.116, read from bytes 24..27


@pytest.mark.rtx
@pytest.mark.parametrize("keep", [16, 100, 0.5, -1])
def test_truncated_plan(rtx_plan_bytes, tmp_path, keep):
    n = int(len(rtx_plan_bytes) * keep) if isinstance(keep, float) else (keep if keep > 0 else len(rtx_plan_bytes) - 1)
    p = tmp_path / "cut.plan"
    p.write_bytes(rtx_plan_bytes[:n])
    with pytest.raises(TrtkitError) as ei:
        load_engine(p)
    assert "is truncated" in _one_line(ei)


@pytest.mark.rtx
def test_truncated_per_metadata(rtx_plan_bytes, tmp_path):
    """A plan whose header was not checked (full TensorRT) is still caught by the size `trtkit build` recorded."""
    plan = write_engine(tmp_path, rtx_plan_bytes, None, {"plan": {"bytes": len(rtx_plan_bytes) + 10}})
    with pytest.raises(TrtkitError, match=r"is truncated: \d+ bytes, its metadata records"):
        load_engine(plan)


@pytest.mark.rtx
def test_plan_from_another_version(rtx_plan_bytes, tmp_path):
    old = bytearray(rtx_plan_bytes)
    old[24:28] = bytes([1, 5, 0, 12])  # a TensorRT-RTX 1.5.0.12 plan
    p = tmp_path / "old.plan"
    p.write_bytes(bytes(old))
    with pytest.raises(TrtkitError) as ei:
        load_engine(p)
    msg = _one_line(ei)
    assert "was built with TensorRT-RTX 1.5.0.12 but TensorRT-RTX 1.7" in msg and "rebuild it" in msg


@pytest.mark.rtx
def test_plan_from_another_version_per_metadata(rtx_plan_bytes, tmp_path):
    """Where the header carries no version (full TensorRT plans), the metadata's backend version decides;
    an RTX header's own version wins over the metadata."""
    from trtkit.backend import load_backend
    from trtkit.inspector.plan_file import check_version

    plan = write_engine(tmp_path, rtx_plan_bytes, None, None)
    header = read_plan_header(plan)
    header_no_version = type(header)(header.flavour, header.size_field, None)
    meta = {"backend": {"name": "rtx", "version": "1.4.2.1"}}
    with pytest.raises(TrtkitError, match="built with TensorRT-RTX 1.4.2.1"):
        check_version(plan, header_no_version, meta, load_backend("rtx"))
    check_version(plan, header, meta, load_backend("rtx"))  # the header's own version matches: fine


@pytest.mark.rtx
def test_profile_layers_without_gpu_is_one_line(rtx_plan_bytes, tmp_path):
    from trtkit.backend import load_backend

    if load_backend("rtx").can_run:
        pytest.skip("this machine can run the engine")
    plan = write_engine(tmp_path, rtx_plan_bytes, None, None)
    with pytest.raises(TrtkitError) as ei:
        load_engine(plan, profile_layers=True)
    assert _one_line(ei).startswith("--profile-layers needs TensorRT and a GPU that can run this engine")


def test_bad_metadata(tmp_path, rtx_plan_bytes):
    pytest.importorskip("tensorrt_rtx")
    plan = write_engine(tmp_path, rtx_plan_bytes, None, None)
    plan.with_suffix(".json").write_text("{broken")
    with pytest.raises(TrtkitError, match="engine metadata is not valid JSON"):
        load_engine(plan)


@pytest.mark.rtx
@pytest.mark.gpu
def test_inspector_on_a_real_engine(rtx_plan_bytes, tmp_path):
    """Deserialize, set the opt shapes, run the engine inspector: the layers carry the ONNX node name."""
    from trtkit.backend import load_backend

    if not load_backend("rtx").can_run:
        pytest.skip(load_backend("rtx").why_not_run)
    plan = write_engine(tmp_path, rtx_plan_bytes, None, None)
    src = load_engine(plan, backend="rtx")
    assert src.source == "inspector" and src.layers is not None and src.layers.verbosity == "detailed"
    assert any("/unet/mm/MatMul" in x.onnx_nodes or "/unet/mm/MatMul" in x.name for x in src.layers.layers)
    assert all(d > 0 for x in src.layers.layers for t in x.inputs for d in (t.dims or ()))  # shapes resolved


@pytest.mark.tensorrt
def test_full_tensorrt_inspector_and_profiler(tmp_path):
    """Full TensorRT on a GPU: build a tiny engine at DETAILED verbosity, inspect it and time its layers."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from trtkit.backend import load_backend

    be = load_backend("trt")
    trt = be.trt
    w = numpy_helper.from_array(np.eye(64, dtype=np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="/unet/mm/MatMul"),
                           helper.make_node("Relu", ["y"], ["z"], name="/unet/act/Relu")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", 64])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(tmp_path / "m.onnx"))
    builder = trt.Builder(be.logger)
    net = builder.create_network(0)
    parser = trt.OnnxParser(net, be.logger)
    assert parser.parse_from_file(str(tmp_path / "m.onnx"))
    cfg = builder.create_builder_config()
    cfg.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    prof = builder.create_optimization_profile()
    prof.set_shape("x", (1, 64), (8, 64), (16, 64))
    cfg.add_optimization_profile(prof)
    plan = tmp_path / "m.plan"
    plan.write_bytes(bytes(builder.build_serialized_network(net, cfg)))
    src = load_engine(plan, backend="trt", profile_layers=True, runs=3)
    assert src.source == "inspector" and src.layers.schema in ("trt10", "trt11")
    assert any("/unet/mm/MatMul" in x.onnx_nodes for x in src.layers.layers)
    assert src.timings_ms and all(v >= 0 for v in src.timings_ms.values())
    # the opt shape (8, 64) resolved the dynamic batch
    dims = [t.dims for x in src.layers.layers for t in x.inputs if t.dims]
    assert dims and all(d[0] == 8 for d in dims if len(d) == 2)
    json.dumps(src.layers.to_json())


@pytest.mark.rtx
def test_rtx_plan_runs_here_decision(rtx_plan_bytes, tmp_path):
    """Review finding 13 (inspect side): on Turing, TensorRT-RTX runs plans whose metadata lists 7.5 only;
    never on Orin (8.7) or Hopper. The real RTX backend, described as if on those GPUs."""
    import dataclasses

    from trtkit.backend import load_backend
    from trtkit.inspector.engine_report import plan_targets, runs_here

    plan = write_engine(tmp_path, rtx_plan_bytes, None, None)
    header = read_plan_header(plan)
    real = load_backend("rtx")

    def on(cc):
        return dataclasses.replace(real, gpu=f"GPU (sm_{cc[0]}{cc[1]})", compute_capability=cc)

    turing_plan = {"target": {"compute_capabilities": ["7.5", "8.9"]}}
    default_plan = {"target": {"compute_capabilities": ["8.0", "8.6", "8.9", "12.0"], "default_targets": True}}
    assert plan_targets(turing_plan) == ["7.5", "8.9"] and plan_targets(None) is None
    assert runs_here(on((7, 5)), header, turing_plan) == (True, "")
    assert not runs_here(on((7, 5)), header, default_plan)[0]
    assert not runs_here(on((7, 5)), header, None)[0]
    assert not runs_here(on((8, 7)), header, default_plan)[0]
    assert not runs_here(on((9, 0)), header, default_plan)[0]
    assert runs_here(on((8, 9)), header, default_plan) == (True, "")
    ok, why = runs_here(real if real.gpu is None else on((9, 0)), header, default_plan)
    assert not ok and why
    trt_header = type(header)("trt", None, None)
    assert runs_here(on((8, 9)), trt_header, None) == (False, "it is a TensorRT plan and the loaded backend is rtx; "
                                                               "pass --backend trt")


@pytest.mark.tensorrt
def test_undeserializable_plan_falls_back_to_saved_layers(tmp_path):
    """Review finding 8: a plan this TensorRT does not load (here version-compatible: inspect never allows its
    host code) is reported from the saved x.layers.json, with a note naming --from-files."""
    import numpy as np
    import onnx
    from inspect_helpers import fixture_text
    from onnx import TensorProto, helper, numpy_helper

    from trtkit.backend import load_backend

    be = load_backend("trt")
    trt = be.trt
    w = numpy_helper.from_array(np.eye(32, dtype=np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="/unet/mm/MatMul")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(tmp_path / "m.onnx"))
    builder = trt.Builder(be.logger)
    net = builder.create_network(0)
    parser = trt.OnnxParser(net, be.logger)
    assert parser.parse_from_file(str(tmp_path / "m.onnx"))
    cfg = builder.create_builder_config()
    cfg.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)  # carries a lean runtime: host code
    plan = tmp_path / "m.plan"
    plan.write_bytes(bytes(builder.build_serialized_network(net, cfg)))
    plan.with_suffix(".layers.json").write_text(fixture_text("trt10_detailed.json"))
    src = load_engine(plan, backend="trt")
    assert src.source == "saved" and src.layers is not None
    assert any("could not be deserialized" in n and "--from-files" in n for n in src.notes), src.notes
    with pytest.raises(TrtkitError, match="could not be deserialized"):
        load_engine(plan, backend="trt", profile_layers=True)
    plan.with_suffix(".layers.json").unlink()  # nothing saved beside it: the error is the answer
    with pytest.raises(TrtkitError, match="could not be deserialized"):
        load_engine(plan, backend="trt")
# -- newcomer trial P7 / P13: which ONNX the engine report cross-checks against -----------------------


def _unquantized(path):
    import onnx
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    g = helper.make_graph([helper.make_node("Relu", ["latent"], ["sample_out"], name="/vae/Relu")], "vae",
                          [helper.make_tensor_value_info("latent", f32, None)],
                          [helper.make_tensor_value_info("sample_out", f32, None)])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


def _strip_qdq(src, dest):
    """The same slice without its Q/DQ nodes (each Q->DQ pair bypassed)."""
    import onnx

    m = onnx.load(str(src))
    qdq = {"QuantizeLinear", "DequantizeLinear"}
    feed = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type in qdq}

    def root(t):
        while t in feed:
            t = feed[t]
        return t

    keep = [n for n in m.graph.node if n.op_type not in qdq]
    for n in keep:
        for i, t in enumerate(n.input):
            n.input[i] = root(t)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    onnx.save(m, str(dest))
    return dest


def _meta(onnx_path, **extra):
    from trtkit._files import sha256_files
    from trtkit.builder.source import read_onnx

    inputs = list(read_onnx(onnx_path).inputs)
    return {"backend": {"name": "rtx", "version": "1.7.1.116"},
            "precision": {"requested": "int8", "qdq_types": ["int8"]},
            "io": {"inputs": [{"name": n} for n in inputs]},
            "onnx": {"path": str(onnx_path), "sha256": sha256_files([onnx_path])}, **extra}


@pytest.mark.rtx
def test_kept_qdq_onnx_is_the_default(rtx_plan_bytes, tmp_path, qdq_onnx):
    """The build keeps <stem>.qdq.onnx beside the plan; inspect reads it rather than the recorded source."""
    from trtkit._files import sha256_files
    from trtkit.inspector.report import engine_report

    plan_dir = tmp_path / "engines"
    plan_dir.mkdir()
    kept = plan_dir / "unet.qdq.onnx"
    kept.write_bytes(qdq_onnx.read_bytes())
    source = _strip_qdq(qdq_onnx, tmp_path / "unet.onnx")  # the unquantized export the build started from
    plan = write_engine(plan_dir, rtx_plan_bytes, None, _meta(source, qdq_onnx={
        "path": "unet.qdq.onnx", "sha256": sha256_files([kept]), "files": ["unet.qdq.onnx"]}))
    r = engine_report(plan)
    assert r.onnx is not None and r.onnx.path == kept and not any("no Q/DQ" in n for n in r.notes)
    kept.unlink()  # an engine built before trtkit kept it: the note must not read as "not 8-bit"
    r = engine_report(plan)
    note = next(n for n in r.notes if "has no Q/DQ" in n)
    assert "the int8 Q/DQ came from the build's own pass" in note and "unet.qdq.onnx" in note


@pytest.mark.rtx
def test_onnx_of_another_model_is_refused(rtx_plan_bytes, tmp_path, qdq_onnx, fp8_onnx):
    """`inspect unet.plan --onnx vae_decoder.onnx` was accepted although the metadata has the ONNX's sha256."""
    from trtkit.inspector.report import engine_report

    plan = write_engine(tmp_path / "e", rtx_plan_bytes, None, _meta(qdq_onnx))
    vae = _unquantized(tmp_path / "vae_decoder.onnx")
    with pytest.raises(TrtkitError, match="--onnx vae_decoder.onnx is not the model unet.plan was built from: "
                                          "its inputs are latent"):
        engine_report(plan, onnx=vae)
    assert not any("--onnx" in n for n in engine_report(plan, onnx=qdq_onnx).notes)  # the recorded one
    r = engine_report(plan, onnx=fp8_onnx)  # same interface, other bytes: used, with a note
    assert any("--onnx slice.fp8.onnx is not the file unet.plan was built from" in n for n in r.notes)
