"""The Q/DQ pass's weight quantization in threads (graph/rewrite.py quantized_weights): the same arrays, in the
same order, as one at a time, with SmoothQuant scaling along the input axis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from trtkit.graph.rewrite import quantized_weights
from trtkit.graph.scales import quantize_weight


def test_threaded_equals_sequential(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(7):
        w = rng.standard_normal((16 + i, 8)).astype(np.float32)
        s = rng.uniform(0.5, 2.0, 8).astype(np.float32) if i % 2 else None
        jobs.append((gs.Constant(f"w{i}", w), s, 0, 1))
    for precision in ("int8", "fp8"):
        one = list(quantized_weights(jobs, tmp_path, precision, False, workers=1))
        many = list(quantized_weights(jobs, tmp_path, precision, False, workers=3))
        assert len(one) == len(many) == len(jobs)
        for (q1, s1), (q2, s2), (c, s, axis, _) in zip(one, many, jobs, strict=True):
            assert np.array_equal(q1, q2) and np.array_equal(s1, s2)
            w = c.values * (s.reshape(1, -1) if s is not None else 1)
            q, sc = quantize_weight(w, axis, precision, False)
            assert np.array_equal(q1, q) and np.array_equal(s1, sc)
