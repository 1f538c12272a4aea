"""The Q/DQ pass on the tiny SDXL-architecture UNet: counts per level, numbers against onnxruntime's
FP32 run, the stored 8-bit weights, shared Q/DQ, SmoothQuant, and the errors users meet."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.graph.conftest import attention_model, plain_model
from trtkit.calibfile import Calibration, save
from trtkit.errors import TrtkitError
from trtkit.exporter import run_onnxruntime
from trtkit.graph.qdq import QuantizeConfig, dequantize_weight, quantize, quantize_weight

# (precision, level) -> quantized (linear, conv, attention) of 148 linear, 35 conv, 24 attention.
# conv: 35 - conv_in - conv_out - 7 conv_shortcut = 26 at every level. linear: 24 ff.net (L2),
# + 72 to_q/k/v (L2.5), + 30 to_out/proj_in (L3); never the 16 embedding/time_emb_proj Gemms or 6 proj_out.
EXPECTED = {
    ("int8", 1.0): (0, 26, 0), ("int8", 2.0): (24, 26, 0), ("int8", 2.5): (96, 26, 0),
    ("int8", 3.0): (126, 26, 0), ("int8", 4.0): (126, 26, 0),
    ("fp8", 1.0): (0, 26, 0), ("fp8", 2.0): (24, 26, 0), ("fp8", 2.5): (96, 26, 0),
    ("fp8", 3.0): (126, 26, 0), ("fp8", 4.0): (126, 26, 24),
}
# Output error bound vs FP32, as max|out - ref| / max|ref| on unseen seeded inputs, max calibration.
# Measured: INT8 0.04-0.05, FP8 0.09-0.10, FP16 alone < 0.005 (tiny random-weight UNet).
BOUND = {"int8": 0.08, "fp8": 0.16}


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(out.astype(np.float32) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("precision,level", sorted(EXPECTED))
def test_counts_and_error_per_level(precision: str, level: float, quantized_cache, tiny_feeds, tiny_ref,
                                    record_property) -> None:
    r = quantized_cache(precision, level)
    got = tuple(r.counts[k]["quantized"] for k in ("linear", "conv", "attention"))
    assert got == EXPECTED[(precision, level)]
    assert tuple(r.counts[k]["total"] for k in ("linear", "conv", "attention")) == (148, 35, 24)
    model = onnx.load(str(r.path))
    ops = Counter(n.op_type for n in model.graph.node)
    n_weighted = got[0] + got[1]
    # one weight DQ per quantized op, activation pairs shared (q/k/v of one input), 4 pairs per attention
    assert ops["DequantizeLinear"] == n_weighted + r.qdq_pairs
    assert ops["QuantizeLinear"] == r.qdq_pairs
    assert r.qdq_pairs <= n_weighted + 4 * got[2]
    err = rel_err(run_onnxruntime(r.path, tiny_feeds)[0], tiny_ref)
    record_property(f"rel_err_{precision}_l{level:g}", err)
    print(f"\n{precision} level {level:g}: {got} quantized, output error vs FP32 {err:.4f}")
    assert err < BOUND[precision]


def test_graph_is_valid_and_sorted(quantized_cache) -> None:
    for key in (("int8", 3.0), ("fp8", 4.0)):
        model = onnx.load(str(quantized_cache(*key).path))
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
        seen = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
        for n in model.graph.node:
            assert all(not x or x in seen for x in n.input), f"{n.name} is not in topological order"
            seen.update(n.output)


def test_weights_stored_quantized_per_channel(quantized_cache, tiny_unet_onnx: Path) -> None:
    src = onnx.load(str(tiny_unet_onnx))
    for precision in ("int8", "fp8"):
        r = quantized_cache(precision, 3.0, False)
        model = onnx.load(str(r.path))
        inits = {i.name: i for i in model.graph.initializer}
        want = onnx.TensorProto.INT8 if precision == "int8" else onnx.TensorProto.FLOAT8E4M3FN
        dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
        assert len(dqs) == 126 + 26
        assert all(inits[n.input[0]].data_type == want for n in dqs)
        axes = Counter(next(a.i for a in n.attribute if a.name == "axis") for n in dqs)
        assert axes == {1: 126, 0: 26}  # MatMul [in, out] on axis 1, Conv on axis 0
        # the ONNX shrinks: 8-bit weights (about 2 M parameters)
        assert r.path.stat().st_size < 0.55 * tiny_unet_onnx.stat().st_size
    # numbers: the stored to_q weight dequantizes to the FP32 one within half a step per channel
    w = next(numpy_helper.to_array(i) for i in src.graph.initializer
             if i.name == next(n.input[1] for n in src.graph.node
                               if n.name.endswith("transformer_blocks.0/attn1/to_q/MatMul")
                               and "down_blocks.1/attentions.0" in n.name))
    for precision in ("int8", "fp8"):
        q, s = quantize_weight(w, 1, precision, fp16=False)
        back = dequantize_weight(q, s, 1, precision)
        step = s[None, :] if precision == "int8" else np.abs(w) * 2.0**-3 + s[None, :] * 2.0**-9
        assert np.all(np.abs(back - w) <= step * 0.5 + 1e-7)
        assert np.allclose(np.abs(w).max(axis=0), np.abs(back).max(axis=0), rtol=1e-6)  # amax channel exact


def test_one_qdq_per_tensor_shared(quantized_cache) -> None:
    model = onnx.load(str(quantized_cache("int8", 3.0).path))
    q_inputs = Counter(n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert max(q_inputs.values()) == 1  # never two Q on one tensor
    consumers = Counter()
    by_out = {n.output[0]: n for n in model.graph.node}
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[0] in by_out and by_out[n.input[0]].op_type == "DequantizeLinear":
            consumers[n.input[0]] += 1
    # q/k/v of a self-attention read one DQ; all 2x12 cross-attention to_k/to_v share the
    # encoder_hidden_states one
    assert sorted(consumers.values())[-1] == 24
    assert list(consumers.values()).count(3) == 12


def test_calibration_file_scales_and_smoothquant(tmp_path: Path, tiny_unet_onnx: Path, tiny_feeds, tiny_ref) -> None:
    import onnx_graphsurgeon as gs

    from trtkit.graph import patterns

    m = patterns.find(gs.import_onnx(onnx.load(str(tiny_unet_onnx))), "/unet/")
    # ranges as max calibration measured them (rounded up), written into a calibration file
    r0 = quantize(QuantizeConfig(onnx_path=tiny_unet_onnx, output=tmp_path / "q0.onnx", precision="int8", fp16=False))
    amax = {d.module: float(np.float16(d.amax * 1.01)) for d in r0.decisions if d.quantized}
    assert len(amax) == 126 + 26 and set(amax) <= m.modules()
    cal = Calibration(precision="int8", activations=amax)
    base = "down_blocks.1.attentions.0.transformer_blocks.0"
    rng = np.random.default_rng(0)
    s_qkv = rng.uniform(0.5, 2.0, 64).astype(np.float32)
    for p in ("to_q", "to_k", "to_v"):  # one vector for the three: folded into norm1
        cal.smooth[f"{base}.attn1.{p}"] = s_qkv
    cal.smooth[f"{base}.ff.net.2"] = rng.uniform(0.5, 2.0, 256).astype(np.float32)  # after GELU: a Mul
    calib = save(cal, tmp_path / "calib.json")
    r = quantize(QuantizeConfig(onnx_path=tiny_unet_onnx, output=tmp_path / "q.onnx", precision="int8",
                                calib=calib, fp16=False))
    assert r.calibration == "calibration file"
    d = {x.module: x for x in r.decisions}
    ff2 = d[f"{base}.ff.net.2"]
    assert ff2.amax == pytest.approx(amax[ff2.module]) and ff2.amax_source == "calibration"
    model = onnx.load(str(r.path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q_scales = {n.name: inits[n.input[1]].item() for n in model.graph.node if n.op_type == "QuantizeLinear"}
    conv1 = next(v for k, v in q_scales.items() if "down_blocks.0/resnets.0/conv1/input_quantizer" in k)
    assert conv1 == pytest.approx(amax["down_blocks.0.resnets.0.conv1"] / 127, rel=1e-6)
    names = [n.name for n in model.graph.node]
    assert any(nm.endswith("ff/net.2/smooth/Mul") for nm in names)
    assert not any("attentions.0/transformer_blocks.0/attn1/to_q/smooth" in nm for nm in names)
    ln = next(n for n in model.graph.node if n.op_type == "LayerNormalization"
              and "down_blocks.1/attentions.0/transformer_blocks.0/norm1" in n.name)
    src = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tiny_unet_onnx)).graph.initializer}
    gamma0 = src["unet.down_blocks.1.attentions.0.transformer_blocks.0.norm1.weight"]
    assert np.allclose(inits[ln.input[1]], gamma0 / s_qkv)
    # smoothing is exact before quantization: the output stays about as close to FP32 as without it
    err0 = rel_err(run_onnxruntime(r0.path, tiny_feeds)[0], tiny_ref)
    err = rel_err(run_onnxruntime(r.path, tiny_feeds)[0], tiny_ref)
    assert err < max(1.5 * err0, BOUND["int8"])


def test_attention_head_size_rule_and_gemm(tmp_path: Path, attention_onnx) -> None:
    x = np.random.default_rng(3).standard_normal((1, 8, 32)).astype(np.float32)
    for head, quantized in ((16, 1), (8, 0)):
        src = attention_onnx(head=head, heads=32 // head)
        r = quantize(QuantizeConfig(onnx_path=src, output=tmp_path / f"h{head}.onnx", precision="fp8",
                                    include=("to_out",), fp16=False, profile="tiny-256"))
        assert r.counts["attention"]["quantized"] == quantized
        assert r.counts["linear"]["quantized"] == 4
        if not quantized:
            assert "head size 8 is not a multiple of 16" in r.notes[-1]
        model = onnx.load(str(r.path))
        gemm_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and "to_out.0/weight_quantizer" in n.name]
        assert [a.i for a in gemm_dq[0].attribute if a.name == "axis"] == [0]  # Gemm transB: axis 0
        ref = run_onnxruntime(src, {"x": x})[0]
        assert rel_err(run_onnxruntime(r.path, {"x": x})[0], ref) < 0.3  # FP8 everywhere: measured 0.22


def test_include_exclude_and_defaults(quantized_cache, tmp_path: Path, tiny_unet_onnx: Path) -> None:
    r = quantize(QuantizeConfig(onnx_path=tiny_unet_onnx, output=tmp_path / "q.onnx", precision="int8", level=1,
                                include=("conv_in", "*time_emb_proj"), exclude=("up_blocks.1*",)))
    d = {x.module: x for x in r.decisions}
    assert d["conv_in"].quantized and d["conv_in"].reason == "included by --include conv_in"
    assert d["down_blocks.0.resnets.0.time_emb_proj"].quantized
    assert not d["up_blocks.1.resnets.0.conv1"].quantized
    assert d["up_blocks.1.resnets.0.time_emb_proj"].reason == "excluded by --exclude up_blocks.1*"
    assert d["conv_out"].reason == "default exclusion (conv_out)"
    assert "needs level >= 2" in d["down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"].reason


@pytest.mark.parametrize("case", ["missing", "garbage", "plain", "already", "opset", "calib", "level", "same"])
def test_bad_inputs_clear_errors(case: str, tmp_path: Path, tiny_unet_onnx: Path, quantized_cache) -> None:
    out = tmp_path / "out.onnx"
    kw = dict(onnx_path=tiny_unet_onnx, output=out, precision="int8")
    needle = {"missing": "does not exist", "garbage": "not a readable ONNX", "plain": "nothing matched",
              "already": "already contains", "opset": "opset 17", "calib": "which unet.onnx does not have",
              "level": "not one of", "same": "must not overwrite"}[case]
    if case == "missing":
        kw["onnx_path"] = tmp_path / "nope.onnx"
    elif case == "garbage":
        (tmp_path / "g.onnx").write_bytes(b"\x08\x07garbage")
        kw["onnx_path"] = tmp_path / "g.onnx"
    elif case == "plain":
        onnx.save(plain_model(), str(tmp_path / "p.onnx"))
        kw["onnx_path"] = tmp_path / "p.onnx"
    elif case == "already":
        kw["onnx_path"] = quantized_cache("int8", 3.0).path
    elif case == "opset":
        onnx.save(attention_model(opset=17), str(tmp_path / "a17.onnx"))
        kw.update(onnx_path=tmp_path / "a17.onnx", precision="fp8")
    elif case == "calib":
        kw["calib"] = save(Calibration(activations={"down_blocks.9.resnets.0.conv1": 1.0}), tmp_path / "c.json")
    elif case == "level":
        kw["level"] = 5
    elif case == "same":
        kw["output"] = tiny_unet_onnx
    with pytest.raises(TrtkitError, match=needle) as e:
        quantize(QuantizeConfig(**kw))
    assert "\n" not in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".qdq-*"))


def test_external_data_input(tmp_path: Path, tiny_unet_onnx: Path, tiny_feeds) -> None:
    """Weights in a .data file are read one by one; the result equals the in-file one."""
    src = tmp_path / "ext" / "unet.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(str(tiny_unet_onnx)), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="unet.onnx.data", size_threshold=1024)
    outs = []
    for path in (src, tiny_unet_onnx):
        r = quantize(QuantizeConfig(onnx_path=path, output=tmp_path / f"q{len(outs)}.onnx", precision="fp8"))
        assert r.counts["attention"]["quantized"] == 24
        outs.append(run_onnxruntime(r.path, tiny_feeds)[0])
    assert not (tmp_path / "q0.onnx.data").exists()  # small result: one self-contained file
    assert np.array_equal(outs[0], outs[1])


def test_unscoped_graph_quantizes_with_honest_names(tmp_path: Path, tiny_unet_onnx: Path, tiny_feeds, tiny_ref) -> None:
    model = onnx.load(str(tiny_unet_onnx))
    for i, n in enumerate(model.graph.node):
        n.name = f"{n.op_type}_{i}"
    del model.metadata_props[:]
    src = tmp_path / "noscope.onnx"
    onnx.save(model, str(src))
    r = quantize(QuantizeConfig(onnx_path=src, output=tmp_path / "q.onnx", precision="int8", level=3))
    assert any("no module scope" in n for n in r.notes)
    d = {x.module: x for x in r.decisions}
    assert not d["conv_in"].quantized and d["down_blocks.0.resnets.0.conv1"].quantized  # initializer names
    assert r.counts["conv"]["quantized"] == 26
    # bias-free MatMuls have no name to match exclusions against: level 3 takes them all (the note says why)
    assert r.counts["linear"]["quantized"] == 148 - 16
    assert rel_err(run_onnxruntime(r.path, tiny_feeds)[0], tiny_ref) < BOUND["int8"]


def test_max_calibration_equals_numpy_over_full_tensors(tiny_unet_onnx: Path) -> None:
    """The sample run reduces each tensor to its amax inside onnxruntime (to save memory): the numbers
    must be exactly numpy's max |x| over the same tensors exposed as outputs of a default session."""
    import onnxruntime as ort

    from trtkit.graph.qdq import _sample_feeds, max_calibrate

    model = onnx.load(str(tiny_unet_onnx))
    names = sorted({n.input[0] for n in model.graph.node if n.op_type in ("MatMul", "Conv", "Gemm")})[:60]
    got = max_calibrate(model, names, "tiny-256", seed=0)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    outs = sess.run(names, _sample_feeds(model, "tiny-256", 0))
    assert got == {t: float(np.max(np.abs(o))) for t, o in zip(names, outs, strict=True)}


def test_large_external_source_spills_weights(tmp_path: Path, tiny_unet_onnx: Path, tiny_feeds,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A source past 2 GB of external data (the limit lowered here) has its 8-bit weights written to the
    output's data file as they are made, so the pass holds none of them: the result is the in-memory one's,
    weight for weight, with the rest of the tensors appended to the same data file."""
    from onnx.numpy_helper import to_array

    import trtkit.graph.qdq as qdq

    src = tmp_path / "ext" / "unet.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(str(tiny_unet_onnx)), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="unet.onnx.data", size_threshold=1024)
    mem = quantize(QuantizeConfig(onnx_path=src, output=tmp_path / "mem" / "q.onnx", precision="fp8"))
    monkeypatch.setattr(qdq, "ONNX_PROTO_LIMIT", 0)
    spilled = quantize(QuantizeConfig(onnx_path=src, output=tmp_path / "spill" / "q.onnx", precision="fp8"))
    assert not (tmp_path / "mem" / "q.onnx.data").exists()
    assert (tmp_path / "spill" / "q.onnx.data").is_file()
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == ["q.onnx", "q.onnx.data"]  # no staging left
    a = {t.name: t for t in onnx.load(str(mem.path)).graph.initializer}
    b = {t.name: t for t in onnx.load(str(spilled.path)).graph.initializer}
    assert a.keys() == b.keys()
    fp8 = [n for n, t in a.items() if t.data_type == onnx.TensorProto.FLOAT8E4M3FN and len(t.dims) > 1]
    assert len(fp8) > 20
    for n in a:
        assert a[n].data_type == b[n].data_type and to_array(a[n]).tobytes() == to_array(b[n]).tobytes(), n
    assert np.array_equal(run_onnxruntime(mem.path, tiny_feeds)[0], run_onnxruntime(spilled.path, tiny_feeds)[0])


def test_failed_spilling_pass_leaves_nothing(tmp_path: Path, tiny_unet_onnx: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import trtkit.graph.qdq as qdq

    src = tmp_path / "ext" / "unet.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(str(tiny_unet_onnx)), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="unet.onnx.data", size_threshold=1024)
    monkeypatch.setattr(qdq, "ONNX_PROTO_LIMIT", 0)

    def broken(*a, **k):
        raise TrtkitError("fp16 pass failed")

    monkeypatch.setattr("trtkit.graph.fp16.to_fp16", broken)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TrtkitError, match="fp16 pass failed"):
        quantize(QuantizeConfig(onnx_path=src, output=out / "q.onnx", precision="fp8"))
    assert list(out.iterdir()) == []
