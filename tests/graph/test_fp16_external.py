"""The FP16 pass on a model with external data streams its weights: no weight is loaded through the
graph, the output equals the in-memory pass's bit for bit, and its data file holds FP16 weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from trtkit.exporter import run_onnxruntime
from trtkit.graph.fp16 import convert_fp16


def test_streamed_equals_in_memory(tiny_unet_onnx: Path, tiny_feeds: dict[str, np.ndarray], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from onnx.external_data_helper import uses_external_data
    from onnx_graphsurgeon.ir.tensor import LazyValues

    ext = tmp_path / "ext"
    ext.mkdir()
    m = onnx.load(str(tiny_unet_onnx))
    onnx.save(m, str(ext / "unet.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="unet.onnx.data", size_threshold=1024)
    inline = convert_fp16(tiny_unet_onnx, tmp_path / "inline.fp16.onnx")

    real_load = LazyValues.load

    def guarded(self):  # type: ignore[no-untyped-def]
        assert not uses_external_data(self.tensor), f"{self.tensor.name} loaded whole through the graph"
        return real_load(self)

    monkeypatch.setattr(LazyValues, "load", guarded)
    streamed = convert_fp16(ext / "unet.onnx", ext / "unet.fp16.onnx")
    monkeypatch.undo()

    a = run_onnxruntime(streamed, tiny_feeds)[0]
    b = run_onnxruntime(inline, tiny_feeds)[0]
    np.testing.assert_array_equal(a, b)
    src_bytes = (ext / "unet.onnx.data").stat().st_size
    out_bytes = (ext / "unet.fp16.onnx.data").stat().st_size
    assert 0.45 * src_bytes < out_bytes < 0.55 * src_bytes  # FP16 weights (+ alignment, small FP32 islands)
    model = onnx.load(str(streamed), load_external_data=False)
    assert all(t.external_data[0].value == "unet.fp16.onnx.data" for t in model.graph.initializer
               if uses_external_data(t))
