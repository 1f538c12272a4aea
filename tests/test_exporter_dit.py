"""trtkit/exporter_dit.py's weight-transpose folding on a model whose weights stay on disk (the layout torch's
exporter writes past 2 GB: one file per tensor), and the 16-bit export of a tiny FLUX transformer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trtkit.exporter_dit import fold_weight_transposes, inline_attribute_tensors
from trtkit.graph.external import Streamer


def _transposed_matmuls(n: int = 3) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(n):
        w = rng.standard_normal((8, 6 if i == 0 else 8)).astype(np.float16)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("Transpose", [f"w{i}"], [f"wt{i}"], perm=[1, 0], name=f"T{i}"),
                  helper.make_node("MatMul", [x, f"wt{i}"], [f"y{i}"], name=f"M{i}")]
        x = f"y{i}"
    # a Constant node's tensor, which torch also writes to a file of its own past 2 GB
    nodes += [helper.make_node("Constant", [], ["c"], name="C",
                               value=numpy_helper.from_array(np.full((8,), 0.5, np.float16), "c_value")),
              helper.make_node("Add", [x, "c"], ["out"], name="A")]
    x = "out"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 6])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT16, [2, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def test_fold_on_disk_equals_in_memory(tmp_path: Path) -> None:
    import onnxruntime as ort

    raw = tmp_path / "raw"
    raw.mkdir()
    onnx.save(_transposed_matmuls(), str(raw / "m.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)  # torch's: a file per tensor
    mem = onnx.load(str(raw / "m.onnx"))
    assert fold_weight_transposes(mem) == 3
    disk = onnx.load(str(raw / "m.onnx"), load_external_data=False)
    assert inline_attribute_tensors(disk, raw) == 1
    assert fold_weight_transposes(disk, raw) == 3
    assert not any((raw / f"w{i}").exists() for i in range(3))  # each weight on disk once
    (raw / "c_value").unlink()  # inlined: the output must not need it
    out = tmp_path / "out"
    out.mkdir()
    Streamer(raw).write(disk, out / "m.onnx", strict=False, check=False)
    assert (out / "m.onnx.data").is_file()
    assert [n.op_type for n in disk.graph.node] == ["MatMul"] * 3 + ["Constant", "Add"]
    got = onnx.load(str(out / "m.onnx"))
    want = {t.name: numpy_helper.to_array(t) for t in mem.graph.initializer}
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in got.graph.initializer} == \
        {k: v.tobytes() for k, v in want.items()}
    x = np.random.default_rng(1).standard_normal((2, 6)).astype(np.float16)
    mem_path = tmp_path / "mem.onnx"
    onnx.save(mem, str(mem_path))
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for p in (mem_path, out / "m.onnx")]
    assert np.array_equal(run[0], run[1])


def test_float16_export_quantizes_like_float32(tiny_dit_dir, tiny_dit_onnx, tmp_path: Path) -> None:
    """`dtype="float16"` (what a FLUX-size export uses: 24 GB instead of 48) keeps FP32 inputs and output,
    stores FP16 weights, matches the FP32 export, and goes through the FP8 level-4 pass (whose FP16 pass now
    types the FP32 islands of a 16-bit graph) to the same error against FP32 as the FP32 export does."""
    from trtkit.exporter import ExportConfig, export, run_onnxruntime
    from trtkit.graph.qdq import QuantizeConfig, quantize
    from trtkit.graph.ranges import sample_feeds

    ref_path = tiny_dit_onnx("flux")
    r = export(ExportConfig(model_dir=tiny_dit_dir("flux"), component="transformer", profile="tiny-256",
                            out_dir=tmp_path / "fp16", dtype="float16"))
    assert r.max_rel_err is not None and r.max_rel_err < 5e-3  # against torch in FP16
    m = onnx.load(str(r.path))
    assert {i.type.tensor_type.elem_type for i in (*m.graph.input, *m.graph.output)} <= {TensorProto.FLOAT,
                                                                                       TensorProto.INT64}
    big = [t for t in m.graph.initializer if len(t.dims) == 2 and min(t.dims) > 8]
    assert big and all(t.data_type == TensorProto.FLOAT16 for t in big)
    feeds = sample_feeds(onnx.load(str(ref_path)), "tiny-256", seed=1)
    ref = run_onnxruntime(ref_path, feeds)[0]

    def rel(x: np.ndarray) -> float:
        return float(np.max(np.abs(x.astype(np.float32) - ref)) / np.max(np.abs(ref)))

    assert rel(run_onnxruntime(r.path, feeds)[0]) < 5e-3
    errs = []
    for src in (ref_path, r.path):
        q = quantize(QuantizeConfig(onnx_path=src, output=tmp_path / f"q{len(errs)}.onnx", precision="fp8", level=4))
        assert q.counts["attention"]["quantized"] == q.counts["attention"]["total"] > 0
        errs.append(rel(run_onnxruntime(q.path, feeds)[0]))
    print(f"\nFP8 L4 output error vs the FP32 export: from FP32 {errs[0]:.4f}, from FP16 {errs[1]:.4f}")
    assert 0 < errs[1] < 1.5 * errs[0] + 1e-3, errs
