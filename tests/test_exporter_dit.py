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
